"""Two-process gloo data-parallel training through the torchrun environment variables.

Each spawned process sets WORLD_SIZE / RANK / LOCAL_RANK / MASTER_ADDR / MASTER_PORT the way
torchrun does and calls ``train``, which detects them, initialises the process group itself and
wraps the loss in DistributedDataParallel. The ranks start from different weights and draw
different batches, so identical final weights show both the initial broadcast and the gradient
all-reduce; a DDP run stopped and resumed must equal the straight DDP run bitwise.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from scoresde.checkpoint import load_checkpoint
from scoresde.train import CHECKPOINT_NAME, TrainOptions, train

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss(model, x0, generator):
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return (model(x0 + 0.5 * z) - z).pow(2).mean()


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16, dtype=torch.float64), nn.Tanh(), nn.Linear(16, 2, dtype=torch.float64))


def _worker(rank, world_size, ports, root):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    data = torch.randn(40, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    opts = dict(batch_size=8, warmup=2, lr=1e-2, ema_rate=0.9, log_every=3, seed=5)
    runs = {"straight": [(ports[0], 8)], "resumed": [(ports[1], 4), (ports[2], 8)]}
    for name, phases in runs.items():
        for port, n in phases:
            os.environ["MASTER_PORT"] = str(port)
            model = _model(seed=100 + rank)  # different initial weights on each rank
            res = train(model, _loss, data, TrainOptions(n_steps=n, **opts), os.path.join(root, name), progress=False)
            assert res.world_size == world_size and not dist.is_initialized()
        torch.save({"model": model.state_dict(), "ema": res.ema.module.state_dict()},
                   os.path.join(root, f"{name}_rank{rank}.pt"))


def test_two_process_gloo_keeps_ranks_identical_and_resumes_exactly(tmp_path):
    ports = [_free_port() for _ in range(3)]
    mp.spawn(_worker, args=(2, ports, str(tmp_path)), nprocs=2, join=True)
    out = {(n, r): torch.load(tmp_path / f"{n}_rank{r}.pt") for n in ("straight", "resumed") for r in (0, 1)}
    for name in ("straight", "resumed"):
        for part in ("model", "ema"):
            a, b = out[(name, 0)][part], out[(name, 1)][part]
            assert all(torch.equal(a[k], b[k]) for k in a), f"{name} {part}: ranks differ"
    for part in ("model", "ema"):
        a, b = out[("straight", 0)][part], out[("resumed", 0)][part]
        assert all(torch.equal(a[k], b[k]) for k in a), f"{part}: resumed DDP run differs from straight run"
    # the weights moved away from rank 0's initial weights, and both ranks' RNG states were saved
    init = _model(seed=100).state_dict()
    assert any(not torch.equal(init[k], out[("straight", 0)]["model"][k]) for k in init)
    ck = load_checkpoint(tmp_path / "straight" / CHECKPOINT_NAME)
    assert ck["world_size"] == 2 and ck["step"] == 8 and len(ck["rank_states"]) == 2
    assert not torch.equal(ck["rank_states"][0]["noise_gen"], ck["rank_states"][1]["noise_gen"])
    with pytest.raises(ValueError, match="world size"):  # a 2-rank checkpoint cannot resume exactly on 1 process
        train(_model(0), _loss, torch.zeros(4, 2, dtype=torch.float64), TrainOptions(n_steps=9, batch_size=8, warmup=2,
              lr=1e-2, ema_rate=0.9, log_every=3, seed=5), tmp_path / "straight", progress=False)
