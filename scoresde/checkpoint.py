"""Atomic checkpoint files and clear errors for corrupt or mismatched ones.

``save_checkpoint`` writes to a temporary file in the target's directory, flushes and
``fsync``s it, then ``os.replace``s it over the target (and ``fsync``s the directory), so a
crash at any point leaves either the old or the new file, never a torn one.
``load_checkpoint`` raises ``ValueError`` naming the file when it cannot be read, and
``check_state_dict`` names the keys and shapes when a checkpoint does not fit a model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "check_state_dict", "load_model_weights"]


def save_checkpoint(path, state: dict) -> Path:
    """Atomically write ``state`` (a dict of tensors / plain Python values) to ``path``; returns the path."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict; got {type(state).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# a run directory's two checkpoints: when one is unreadable, the message points to the other
_OTHER = {"checkpoint.pt": "best.pt", "best.pt": "checkpoint.pt"}


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (torch's zip errors go on for lines)."""
    text = str(e).strip().splitlines()
    first = text[0].split(". ")[0].rstrip(".") if text else ""
    return f"{type(e).__name__}: {first}"


def load_checkpoint(path, map_location=None, required_keys=(), mmap: bool = False) -> dict:
    """Read a checkpoint written by ``save_checkpoint`` (``weights_only`` unpickling; ``mmap``: map the file
    instead of reading it, for a quick look at a few entries).

    Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError`` naming the file if it
    is corrupt or truncated (suggesting the run's other checkpoint if there is one), not a dict, or lacks
    any of ``required_keys``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torn zip, pickle errors, EOF, ...
        other = path.with_name(_OTHER[path.name]) if path.name in _OTHER else None
        hint = f"; the run's other checkpoint {str(other)!r} may still be good (give it as ckpt)" if other and other.is_file() else ""
        raise ValueError(f"checkpoint file {str(path)!r} is corrupt or truncated ({_first_line(e)}){hint}") from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint file {str(path)!r} holds a {type(state).__name__}, expected a dict")
    missing = [k for k in required_keys if k not in state]
    if missing:
        raise ValueError(f"checkpoint file {str(path)!r} lacks the entries {missing}; has {sorted(state)}")
    return state


def check_state_dict(model: nn.Module, state_dict: dict, source="checkpoint") -> None:
    """Raise ``ValueError`` (naming ``source``) unless ``state_dict`` has exactly ``model``'s keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and torch.is_tensor(state_dict[k]) and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches [{'; '.join(shapes[:8])}{' ...' if len(shapes) > 8 else ''}]")
        raise ValueError(f"{source} does not match the model architecture: " + ", ".join(parts))


def load_model_weights(model: nn.Module, path, which: str = "ema") -> dict:
    """Load weights from a training checkpoint into ``model`` in place.

    ``which="ema"`` takes the EMA weights, ``"model"`` the raw trained weights. Returns the whole
    checkpoint dict (e.g. for its ``step`` and ``metrics``). Raises ``ValueError`` naming the file on
    a corrupt checkpoint or an architecture mismatch.
    """
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model'; got {which!r}")
    state = load_checkpoint(path, map_location="cpu", required_keys=(which,))
    sd = state["ema"]["module"] if which == "ema" else state["model"]
    check_state_dict(model, sd, source=f"checkpoint file {str(path)!r}")
    model.load_state_dict(sd)
    return state
