"""DDP on CPU (gloo, 2 processes): adapters, PEMA's theta* and results stay identical on every rank.

Each rank trains on half of every global batch; gradients are averaged by DDP and
the per-sample Fisher sums are all-reduced before PEMA reads them, so both ranks
must end bit-identical, and (dropout off) equal to one process on the full batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mage_cl.methods import MethodConfig, make_method
from mage_cl.trainer import Sequencer, TrainConfig

from cl_fakes import tiny_model, toy_tasks
from gloo import init_gloo

CFG = TrainConfig(steps_per_task=3, batch_size=4, lr=1e-2, eval_batch_size=8, max_eval=6, consolidate_batches=2)


def _train(out_file: str, method: str) -> None:
    torch.set_num_threads(1)
    v, model = tiny_model(seed=1)
    tasks = toy_tasks(n_train=12, n_test=6)
    m = make_method(method, MethodConfig(dropout=0.0))
    torch.manual_seed(0)
    m.setup(model)
    seen = {}

    def on_stage(j, st):
        if method == "mage":  # theta* of the task just trained (finish_task copied it into the adapters)
            seen[f"ema{j}"] = [e.clone() for e in m.pema.emas]
            seen[f"names{j}"] = list(m.pema.names)

    stages = Sequencer(model, m, tasks, ["echo", "draw"], CFG, v.pad_id, v.eos_id).run(on_stage=on_stage)
    torch.save({"adapters": m.adapter_state(), "acc": [st.acc for st in stages],
                "fallbacks": m.pema.fallback_count if method == "mage" else 0,
                "state": m.state_dict(), **seen}, out_file)


def _worker(rank: int, world: int, init_file: str, out_dir: str, method: str) -> None:
    init_gloo(init_file, rank, world)
    try:
        _train(os.path.join(out_dir, f"{method}_rank{rank}.pt"), method)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["mage", "pgp"])
def test_two_gloo_ranks_stay_identical_and_match_one_process(tmp_path, method):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), method), nprocs=2, join=True)
    r0 = torch.load(tmp_path / f"{method}_rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / f"{method}_rank1.pt", weights_only=True)
    assert r0["adapters"].keys() == r1["adapters"].keys()
    for k in r0["adapters"]:
        assert torch.equal(r0["adapters"][k], r1["adapters"][k]), k
    if method == "mage":
        for j in (0, 1):
            assert r0[f"names{j}"] == r1[f"names{j}"]
            for a, b in zip(r0[f"ema{j}"], r1[f"ema{j}"]):
                assert torch.equal(a, b)
        assert r0["fallbacks"] == r1["fallbacks"]
    else:
        for k in r0["state"]["basis"]:
            assert torch.equal(r0["state"]["basis"][k], r1["state"]["basis"][k])
    assert r0["acc"] == r1["acc"]
    # one process on the full batches gives the same adapters (up to float summation order)
    single = tmp_path / f"{method}_single.pt"
    _train(str(single), method)
    s = torch.load(single, weights_only=True)
    moved = 0
    for k in s["adapters"]:
        torch.testing.assert_close(r0["adapters"][k], s["adapters"][k], rtol=1e-4, atol=1e-5)
        moved += int(".lora_B." in k and s["adapters"][k].abs().sum() > 0)
    assert moved > 0  # training happened


def test_torchrun_cli_runs_ddp_and_only_rank0_writes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "MAGE_CL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mage_cl.cli", "run", "--method", "mage", "--preset", "smoke", "--steps-per-task", "2",
           "--max-stages", "2", "--no-progress", "--backend", "torch", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["stages_done"] == 2 and meta["config"]["world_size"] == 2
    # rank 0 alone printed the table
    assert proc.stdout.count("| mage |") == 1


def _shutdown_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import mage_kernels as mk
    from mage_cl import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert distributed.init("gloo")
    layer = mk.MageLinear(5, 4, r=2, dropout=0.0)  # its first op call is what used to pin the group
    layer(torch.randn(2, 3, 5)).sum().backward()
    distributed.shutdown()
    tasks = os.listdir("/proc/self/task")
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks]
    with open(os.path.join(out_dir, f"threads{rank}.json"), "w") as f:
        json.dump(names, f)


def test_driver_shutdown_leaves_no_gloo_thread_running(tmp_path):
    """After ``distributed.shutdown`` no gloo thread is left (a left one aborted about 1 exit in 12)."""
    import socket

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs Linux /proc to list the process's threads")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shutdown_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        names = json.loads((tmp_path / f"threads{rank}.json").read_text())
        assert names and not [n for n in names if "gloo" in n], names
