"""Training loop: options, warm-up, EMA arithmetic, atomic checkpoints, exact resume, selection, AMP."""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import scoresde.checkpoint as ckpt_mod
from scoresde.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from scoresde.data.transforms import uniform_dequantize
from scoresde.ema import EMA, ema_decay
from scoresde.train import (CHECKPOINT_NAME, BEST_NAME, METRICS_NAME, TrainOptions, derive_seed, resolve_amp,
                            scheduled_lr, train, warmup_lr)

DT = torch.float64


class TinyNet(nn.Module):
    """2 -> hidden -> 2 with dropout (so the global RNG matters) and a buffer (copied by the EMA)."""

    def __init__(self, hidden=16, dropout=0.1, dtype=DT):
        super().__init__()
        self.l1 = nn.Linear(2, hidden, dtype=dtype)
        self.drop = nn.Dropout(dropout)
        self.l2 = nn.Linear(hidden, 2, dtype=dtype)
        self.register_buffer("calls", torch.zeros((), dtype=dtype))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return self.l2(self.drop(torch.tanh(self.l1(x))))


def denoise_loss(model, x0, generator):
    """Noise-prediction loss at a fixed noise level: E |model(x0 + z/2) - z|^2."""
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return (model(x0 + 0.5 * z) - z).pow(2).mean()


def make_data(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=DT) * 0.5 + 1.0


def make_model(seed=1, **kw):
    torch.manual_seed(seed)
    return TinyNet(**kw)


def opts(**kw):
    base = dict(n_steps=10, batch_size=8, warmup=3, ema_rate=0.9, log_every=2, lr=1e-2)
    base.update(kw)
    return TrainOptions(**base)


def assert_same_state(a: dict, b: dict, where=""):
    assert a.keys() == b.keys(), where
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, dict):
            assert_same_state(va, vb, f"{where}.{k}")
        elif isinstance(va, (list, tuple)):
            assert len(va) == len(vb)
            for i, (x, y) in enumerate(zip(va, vb)):
                if isinstance(x, dict):
                    assert_same_state(x, y, f"{where}.{k}[{i}]")
                else:
                    assert (torch.equal(x, y) if torch.is_tensor(x) else x == y), f"{where}.{k}[{i}]"
        elif torch.is_tensor(va):
            assert torch.equal(va, vb), f"{where}.{k} differs"
        else:
            assert va == vb, f"{where}.{k}: {va} != {vb}"


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("field,value", [
    ("lr", -1e-4), ("lr", 0.0), ("lr", float("nan")), ("ema_rate", 1.0), ("ema_rate", -0.1), ("beta1", 1.0),
    ("beta2", -0.5), ("adam_eps", 0.0), ("warmup", -1), ("warmup", 2.5), ("batch_size", 0), ("n_steps", -3),
    ("grad_clip", 0.0), ("amp", "fp8"), ("select_mode", "best"), ("log_every", 0), ("weight_decay", -1.0),
    ("patience", -1), ("seed", True),
])
def test_options_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TrainOptions(**{field: value})


def test_options_messages_keep_their_form_and_accept_numpy_scalars():
    with pytest.raises(ValueError, match=r"^beta1 must be a number in \[0, 1\); got 1.0$"):
        TrainOptions(beta1=1.0)
    with pytest.raises(ValueError, match=r"^grad_clip must be a finite number > 0 or None; got 0.0$"):
        TrainOptions(grad_clip=0.0)
    with pytest.raises(ValueError, match=r"^warmup must be an integer >= 0; got 2.5$"):
        TrainOptions(warmup=2.5)
    with pytest.raises(ValueError, match="ema_warmup must be a bool"):
        TrainOptions(ema_warmup=1)
    o = TrainOptions(n_steps=np.int64(7), lr=np.float32(0.5), grad_clip=None, ema_rate=np.float64(0.5))
    assert (o.n_steps, o.lr, o.grad_clip, o.ema_rate) == (7, 0.5, None, 0.5)
    assert type(o.n_steps) is int and type(o.lr) is float


def test_derive_seed_keeps_the_63_bit_values_and_gives_the_32_bit_stream_seed():
    for keys in [(0, 0, 0), (1, 2, 3), (123456789, 7, 2), (2**40, 0, 1)]:
        ss = np.random.SeedSequence(list(keys))
        assert derive_seed(*keys) == int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
        assert derive_seed(*keys, bits=32) == int(ss.generate_state(1, dtype=np.uint32)[0])
    assert derive_seed(0, 0, 0) == 7896617691693857887  # the index generator's seed of every seed-0 run so far
    assert derive_seed(5, 1, bits=32) == int(np.random.SeedSequence([5, 1]).generate_state(1, dtype=np.uint32)[0])
    assert 0 <= derive_seed(9, bits=8) < 256
    for bad in [dict(), dict(bits=0), dict(bits=65)]:
        with pytest.raises(ValueError):
            derive_seed(*([] if not bad else [1]), **bad)
    with pytest.raises(ValueError, match="keys"):
        derive_seed(1, -1)


def test_options_names_are_the_same_objects_in_train_and_train_options():
    """The options, schedules, seeds and precision live in ``scoresde.train_options``; ``scoresde.train`` re-exports them."""
    import scoresde.train
    import scoresde.train_options

    for name in scoresde.train_options.__all__:
        assert getattr(scoresde.train, name) is getattr(scoresde.train_options, name)
        assert name in scoresde.train.__all__
    assert TrainOptions is scoresde.train_options.TrainOptions and derive_seed is scoresde.train_options.derive_seed


def test_options_patience_needs_a_metric():
    with pytest.raises(ValueError, match="patience"):
        TrainOptions(patience=3, eval_every=10)


def test_bad_inputs_raise_before_training(tmp_path):
    m = make_model()
    with pytest.raises(ValueError, match="prepare"):
        train(m, denoise_loss, torch.zeros(10, 2, dtype=torch.long), opts(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="select_metric"):
        train(m, denoise_loss, make_data(), opts(select_metric="nll", eval_every=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match="0-d"):
        train(m, lambda mod, x, g: mod(x).pow(2), make_data(), opts(), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="fp16"):
        resolve_amp("fp16", torch.device("cpu"))
    assert resolve_amp("auto", torch.device("cpu")) == "off"


# ----------------------------------------------------------------------------- warm-up
def test_warmup_schedule_values():
    assert warmup_lr(0, 2e-4, 5000) == pytest.approx(2e-4 / 5000, rel=1e-15)
    assert warmup_lr(2499, 2e-4, 5000) == pytest.approx(1e-4, rel=1e-15)
    assert warmup_lr(4999, 2e-4, 5000) == 2e-4
    assert warmup_lr(123456, 2e-4, 5000) == 2e-4
    assert warmup_lr(0, 2e-4, 0) == 2e-4


def test_decay_schedule_values():
    """Cosine / linear decay after warm-up from lr to final_ratio * lr at n_steps; constant is warm-up only."""
    lr, w, n = 1e-3, 100, 1100
    for sched in ("constant", "cosine", "linear"):
        assert scheduled_lr(0, lr, w, n, sched, 0.1) == pytest.approx(lr / w, rel=1e-15)
        assert scheduled_lr(w - 1, lr, w, n, sched, 0.1) == pytest.approx(lr, rel=1e-15)
    assert scheduled_lr(n, lr, w, n, "constant", 0.1) == lr
    # halfway through the decay (p = 1/2): cosine and linear both at r + (1 - r) / 2
    assert scheduled_lr(600, lr, w, n, "cosine", 0.1) == pytest.approx(lr * 0.55, rel=1e-12)
    assert scheduled_lr(600, lr, w, n, "linear", 0.1) == pytest.approx(lr * 0.55, rel=1e-12)
    # p = 1/4: cosine (1 + cos(pi/4)) / 2 = 0.8536; linear 3/4
    assert scheduled_lr(350, lr, w, n, "cosine", 0.0) == pytest.approx(lr * (1 + math.cos(math.pi / 4)) / 2, rel=1e-12)
    assert scheduled_lr(350, lr, w, n, "linear", 0.0) == pytest.approx(lr * 0.75, rel=1e-12)
    assert scheduled_lr(n, lr, w, n, "cosine", 0.1) == pytest.approx(lr * 0.1, rel=1e-12)
    assert scheduled_lr(5 * n, lr, w, n, "linear", 0.0) == 0.0
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        TrainOptions(lr_schedule="step")
    with pytest.raises(ValueError, match="lr_final_ratio must be a number in"):
        TrainOptions(lr_final_ratio=1.5)


def test_decay_is_applied_in_the_loop_and_resumes_exactly(tmp_path):
    data = make_data()
    o = lambda **kw: opts(**{**dict(n_steps=12, warmup=2, log_every=1, lr=1e-2, lr_schedule="cosine", lr_final_ratio=0.2,
                                    checkpoint_every=4), **kw})
    straight = make_model()
    res = train(straight, denoise_loss, data, o(), tmp_path / "a", progress=False)
    lrs = [r["lr"] for r in res.history if "lr" in r]
    assert lrs == pytest.approx([scheduled_lr(n, 1e-2, 2, 12, "cosine", 0.2) for n in range(12)], rel=1e-14)
    calls = {"n": 0}

    def crashing_loss(model, x0, g):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated crash")
        return denoise_loss(model, x0, g)

    with pytest.raises(RuntimeError, match="simulated"):
        train(make_model(), crashing_loss, data, o(), tmp_path / "b", progress=False)
    resumed = make_model()
    train(resumed, denoise_loss, data, o(), tmp_path / "b", progress=False)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    # the decay's end point is part of the run: resuming it with another n_steps is refused, naming the option
    with pytest.raises(ValueError, match="option n_steps was 12, now 20"):
        train(make_model(), denoise_loss, data, o(n_steps=20), tmp_path / "b", progress=False)


def test_checkpoint_from_before_the_schedule_options_resumes(tmp_path):
    """A checkpoint whose options lack lr_schedule / lr_final_ratio resumes under their defaults."""
    train(make_model(), denoise_loss, make_data(), opts(n_steps=4), tmp_path, progress=False)
    path = tmp_path / CHECKPOINT_NAME
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("lr_schedule", "lr_final_ratio"):
        del state["options"][key]
    torch.save(state, path)
    assert train(make_model(), denoise_loss, make_data(), opts(n_steps=6), tmp_path, progress=False).step == 6


def test_warmup_is_applied_in_the_loop(tmp_path):
    res = train(make_model(), denoise_loss, make_data(), opts(n_steps=6, warmup=4, log_every=1, lr=1e-3),
                tmp_path, progress=False)
    lrs = [r["lr"] for r in res.history if "lr" in r]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rel=1e-14)


# ----------------------------------------------------------------------------- EMA
def test_ema_matches_hand_computation():
    m = nn.Linear(1, 1, bias=False, dtype=DT)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = EMA(m, rate=0.5, warmup=True)
    shadow, values = 1.0, [3.0, -2.0, 5.0, 7.0]
    decays = []
    for n, v in enumerate(values, start=1):
        with torch.no_grad():
            m.weight.fill_(v)
        d = ema.update(m)
        decays.append(d)
        shadow = d * shadow + (1 - d) * v
        assert ema.module.weight.item() == pytest.approx(shadow, rel=1e-15, abs=1e-15)
    # (1+n)/(10+n) = 2/11, 3/12, 4/13, 5/14 are all below the rate 0.5
    assert decays == pytest.approx([2 / 11, 3 / 12, 4 / 13, 5 / 14], rel=1e-15)
    assert ema_decay(0.9999, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.9, 10**6) == 0.9
    assert ema_decay(0.9, 1, warmup=False) == 0.9
    ema2 = EMA(m, rate=0.99, warmup=False)
    ema2.load_state_dict(ema.state_dict())
    assert ema2.num_updates == 4 and ema2.rate == 0.5 and torch.equal(ema2.module.weight, ema.module.weight)


def test_ema_copies_buffers_and_rate_zero_tracks_the_model(tmp_path):
    m = make_model(dropout=0.0)
    res = train(m, denoise_loss, make_data(), opts(ema_rate=0.0, n_steps=5), tmp_path, progress=False)
    for (k, a), b in zip(m.state_dict().items(), res.ema.module.state_dict().values()):
        assert torch.equal(a, b), k
    assert res.ema.module.calls.item() == 5 and res.ema.num_updates == 5


# ----------------------------------------------------------------------------- checkpoint files
def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(3.0)})

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(3.0))

    def failing_replace(src, dst):
        raise OSError("power cut before rename")

    monkeypatch.setattr(ckpt_mod.os, "replace", failing_replace)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(path, {"step": 3, "w": torch.ones(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temporary files left behind


def test_corrupt_and_truncated_checkpoints_name_the_file(tmp_path):
    bad = tmp_path / CHECKPOINT_NAME
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=str(bad).replace("\\", "\\\\")):
        train(make_model(), denoise_loss, make_data(), opts(), tmp_path, progress=False)
    good = tmp_path / "good"
    train(make_model(), denoise_loss, make_data(), opts(n_steps=2), good, progress=False)
    raw = (good / CHECKPOINT_NAME).read_bytes()
    (good / CHECKPOINT_NAME).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        train(make_model(), denoise_loss, make_data(), opts(n_steps=4), good, progress=False)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_mismatched_architecture_or_options_are_refused(tmp_path):
    train(make_model(hidden=16), denoise_loss, make_data(), opts(n_steps=2), tmp_path, progress=False)
    path = str(tmp_path / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="shape mismatches") as e:
        train(make_model(hidden=8), denoise_loss, make_data(), opts(n_steps=4), tmp_path, progress=False)
    assert path in str(e.value)
    with pytest.raises(ValueError, match="missing keys"):
        load_model_weights(nn.Sequential(nn.Linear(2, 2)), path)
    with pytest.raises(ValueError, match="seed"):
        train(make_model(), denoise_loss, make_data(), opts(n_steps=4, seed=7), tmp_path, progress=False)


# ----------------------------------------------------------------------------- exact resume
def _final_state(workdir):
    s = load_checkpoint(workdir / CHECKPOINT_NAME)
    return {"model": s["model"], "ema": s["ema"], "optimizer": s["optimizer"], "rank_states": s["rank_states"]}


def test_stop_and_resume_is_bitwise_equal_to_straight_run(tmp_path):
    k, data = 7, make_data()  # 37 examples, batch 8: the stop falls mid-epoch
    m_straight = make_model()
    train(m_straight, denoise_loss, data, opts(n_steps=2 * k), tmp_path / "a", progress=False)
    m1 = make_model()
    r1 = train(m1, denoise_loss, data, opts(n_steps=k), tmp_path / "b", progress=False)
    assert r1.step == k
    m2 = make_model(seed=99)  # a fresh process would build the model with whatever init: it is overwritten
    r2 = train(m2, denoise_loss, data, opts(n_steps=2 * k), tmp_path / "b", progress=False)
    assert r2.step == 2 * k
    for a, b in zip(m_straight.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert_same_state(_final_state(tmp_path / "a"), _final_state(tmp_path / "b"))
    assert any(not torch.equal(a, b) for a, b in zip(m_straight.state_dict().values(), make_model().state_dict().values()))


def test_resume_after_crash_between_checkpoints(tmp_path):
    data = make_data()
    straight = make_model()
    train(straight, denoise_loss, data, opts(n_steps=12, checkpoint_every=4), tmp_path / "a", progress=False)
    calls = {"n": 0}

    def crashing_loss(model, x0, g):
        calls["n"] += 1
        if calls["n"] == 7:  # after the checkpoint at step 4, before the one at 8
            raise RuntimeError("simulated crash")
        return denoise_loss(model, x0, g)

    with pytest.raises(RuntimeError, match="simulated"):
        train(make_model(), crashing_loss, data, opts(n_steps=12, checkpoint_every=4), tmp_path / "b", progress=False)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)["step"] == 4
    resumed = make_model()
    train(resumed, denoise_loss, data, opts(n_steps=12, checkpoint_every=4), tmp_path / "b", progress=False)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert_same_state(_final_state(tmp_path / "a"), _final_state(tmp_path / "b"))
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / METRICS_NAME).read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # records after step 4 were not duplicated


# ----------------------------------------------------------------------------- evaluation, selection, early stopping
def test_best_checkpoint_and_early_stopping(tmp_path):
    scripted = iter([3.0, 2.0, 2.5, 2.6, 1.0])  # best at the 2nd evaluation, then 2 without improvement
    seen = {}

    def eval_fn(ema_model, step):
        assert not ema_model.training
        torch.randn(5)  # consuming the global RNG here must not change training
        seen[step] = {k: v.clone() for k, v in ema_model.state_dict().items()}
        return {"val_nll": next(scripted), "other": 0.0}

    o = opts(n_steps=50, eval_every=3, select_metric="val_nll", patience=2)
    res = train(make_model(), denoise_loss, make_data(), o, tmp_path, eval_fn=eval_fn, progress=False)
    assert res.stopped_early and res.step == 12 and res.best_step == 6 and res.best_value == 2.0
    best = load_model_weights(make_model(), tmp_path / BEST_NAME)
    assert best["step"] == 6 and best["metrics"]["val_nll"] == 2.0
    assert_same_state(best["ema"]["module"], seen[6])
    evals = [json.loads(l) for l in (tmp_path / METRICS_NAME).read_text().splitlines() if "eval" in l]
    assert [e["step"] for e in evals] == [3, 6, 9, 12]
    # the same run without evaluation follows the same parameter trajectory
    plain = make_model()
    train(plain, denoise_loss, make_data(), opts(n_steps=12), tmp_path / "plain", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 load_checkpoint(tmp_path / CHECKPOINT_NAME)["model"].values()))


# ----------------------------------------------------------------------------- precision, prepare, logs
def test_bf16_autocast_on_cpu_trains(tmp_path):
    m = make_model(dtype=torch.float32)
    data = make_data().float()
    res = train(m, denoise_loss, data, opts(n_steps=40, amp="bf16", log_every=20, warmup=0), tmp_path, progress=False)
    assert res.amp == "bf16"
    losses = [r["loss"] for r in res.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_prepare_gets_the_noise_generator_and_training_reduces_the_loss(tmp_path):
    levels = 17
    k = torch.randint(0, levels, (64, 2), generator=torch.Generator().manual_seed(3))

    def prepare(batch, g):
        assert batch.dtype == torch.long and isinstance(g, torch.Generator)
        return uniform_dequantize(batch, levels, generator=g, dtype=DT)

    res = train(make_model(dropout=0.0), denoise_loss, k, opts(n_steps=200, log_every=50, warmup=0, batch_size=32),
                tmp_path, prepare=prepare, progress=False)
    losses = [r["loss"] for r in res.history]
    # the noise-prediction loss of the zero predictor is E|z|^2/D = 1; a trained net does clearly better
    assert losses[-1] < 0.9 * losses[0]
    recs = [json.loads(l) for l in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in recs] == [50, 100, 150, 200] and all(r["steps_per_s"] > 0 for r in recs)


def test_callback_gets_every_metrics_record_and_cannot_change_training(tmp_path, caplog):
    seen = []

    def callback(rec):
        torch.randn(3)  # consuming the global RNG (dropout's) here must not change training
        rec["step"] = -1  # nor may mutating the record change what train keeps
        seen.append(json.loads(json.dumps(rec)))

    o = opts(n_steps=12, eval_every=4, select_metric="v")
    with caplog.at_level(logging.INFO, logger="scoresde.train"):
        res = train(make_model(), denoise_loss, make_data(), o, tmp_path / "cb", eval_fn=lambda m, s: {"v": 1.0 / s},
                    progress=False, callback=callback)
    lines = [json.loads(l) for l in (tmp_path / "cb" / METRICS_NAME).read_text().splitlines()]
    assert len(seen) == len(lines) == len(res.history) == 12 // 2 + 12 // 4
    assert [r["step"] for r in res.history] == [r["step"] for r in lines]
    assert all(r["step"] == -1 for r in seen)
    for a, b in zip(seen, lines):
        assert {k: v for k, v in a.items() if k != "step"} == {k: v for k, v in b.items() if k != "step"}
    assert {"loss", "lr", "steps_per_s", "ema_decay", "grad_norm_max"} <= set(lines[0])
    assert lines[2]["eval"] == {"v": 0.25} and lines[2]["best_step"] == 4
    # the records also go to the "scoresde.train" logger, with the start and the end of the run
    msgs = [r.getMessage() for r in caplog.records if r.name == "scoresde.train"]
    assert msgs[0].startswith("training in") and msgs[-1].startswith("finished at step 12")
    assert sum(m.startswith('{"step"') for m in msgs) == len(lines)
    # same trajectory as a run without the callback
    plain = make_model()
    train(plain, denoise_loss, make_data(), opts(n_steps=12), tmp_path / "plain", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 load_checkpoint(tmp_path / "cb" / CHECKPOINT_NAME)["model"].values()))
    with pytest.raises(TypeError, match="callback"):
        train(make_model(), denoise_loss, make_data(), opts(), tmp_path / "bad", progress=False, callback=42)
