"""DistributedDataParallel on CPU with gloo: one DDP step over two ranks equals one single-process step on
the combined batch, leaving the process group really ends it, and `torchrun -m gpt.train` trains with only
rank 0 logging and checkpointing, every rank exiting cleanly, and Ctrl-C stops every rank at the same step; the
ranks of 2 and 3 draw a batch of their own at every step, and the same ones again after a resume."""

import contextlib
import gc
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt.checkpoint import load_checkpoint
from gpt.model import GPT, GPTConfig
from gpt.step import TrainStep, resolve_settings
from gpt.train import leave_process_group, mean_across_ranks, setup_runtime, wrap_ddp

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
CONFIG = dict(vocab_size=13, block_size=8, n_embd=16, n_head=2, n_layer=2, dropout=0.0)
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def combined_batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(CONFIG["vocab_size"], (2 * WORLD_SIZE, CONFIG["block_size"]), generator=generator)
    y = torch.randint(CONFIG["vocab_size"], (2 * WORLD_SIZE, CONFIG["block_size"]), generator=generator)
    return x, y


def one_step(optimizer_name, x, y, ddp_device=None):
    """A fresh model (seed 0) after one optimizer step on (x, y); DDP-wrapped when ddp_device is given."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    wrap = (lambda module: wrap_ddp(module, ddp_device)) if ddp_device is not None else None
    step = TrainStep(model, OPTIMIZERS[optimizer_name](model.parameters()), resolve_settings("cpu"), "cpu", wrap=wrap)
    return model, step(x, y)


def gloo_threads() -> list[str]:
    """The names of this process's gloo threads (torch names them pt_gloo_*, gloo names its own gloo_*)."""
    tasks = Path("/proc/self/task")
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()] if tasks.is_dir() else []
    return [name for name in names if "gloo" in name]


def ddp_worker(rank, port, result_path):
    # The collector runs whenever allocations trigger it; off, the DDP wrappers below stay in their reference
    # cycles until something collects them on purpose, the worst case for leave_process_group.
    gc.disable()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))  # fmt: skip
    runtime = setup_runtime("cpu")
    assert runtime.distributed and runtime.rank == rank and dist.get_backend() == "gloo"
    x, y = combined_batch()
    shard = slice(2 * rank, 2 * rank + 2)  # each rank sees its own half of the combined batch
    result = {}
    for name in OPTIMIZERS:
        model, loss = one_step(name, x[shard], y[shard], runtime.device)
        result[name] = {"params": model.state_dict(), "mean_loss": mean_across_ranks(loss, runtime)}
    assert gloo_threads() or not Path("/proc/self/task").is_dir(), "the check below would mean nothing"
    leave_process_group()
    # Still holding the last model trained, as gpt.train holds it to sample: its DDP wrapper must not keep the
    # group's threads alive, or one of them may still be releasing tensors when the interpreter shuts down.
    assert not gloo_threads(), f"gloo threads outlived the process group: {gloo_threads()}"
    assert model is not None
    if runtime.is_main:
        torch.save(result, result_path)


def test_one_ddp_step_equals_one_step_on_the_combined_batch(tmp_path):
    result_path = tmp_path / "ddp.pt"
    mp.spawn(ddp_worker, args=(free_port(), str(result_path)), nprocs=WORLD_SIZE, join=True)
    ddp = torch.load(result_path, weights_only=True)
    x, y = combined_batch()
    torch.manual_seed(0)
    initial = GPT(GPTConfig(**CONFIG)).state_dict()
    for name in OPTIMIZERS:
        model, loss = one_step(name, x, y)
        for key, value in model.state_dict().items():
            assert not torch.equal(value, initial[key]), f"{name}: {key} did not move, so the check means little"
            torch.testing.assert_close(ddp[name]["params"][key], value, rtol=0, atol=1e-6, msg=f"{name}: {key}")
        torch.testing.assert_close(ddp[name]["mean_loss"], loss, rtol=0, atol=1e-6)


def torchrun_command(data, out_dir, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
            "-m", "gpt.train", "--data", str(data), "--out-dir", str(out_dir), "--device", "cpu",
            "--n-embd", "16", "--n-head", "2", "--n-layer", "1", "--block-size", "16", "--batch-size", "4",
            "--eval-iters", "1", *extra]  # fmt: skip


TORCHRUN_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def write_text(tmp_path) -> Path:
    data = tmp_path / "input.txt"
    data.write_text("to be, or not to be, that is the question:\n" * 30, encoding="utf-8")
    return data


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-mode", "compile"])
def test_torchrun_trains_with_rank_0_logging_and_checkpointing(tmp_path, compiled):
    """Also with --compile: each rank compiles the model inside its DDP wrapper."""
    command = torchrun_command(write_text(tmp_path), tmp_path / "out", "--max-iters", "4", "--eval-interval", "2",
                               "--sample-tokens", "10", *(["--compile"] if compiled else []))  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=TORCHRUN_ENV, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr, result.stderr
    assert f"DDP over {WORLD_SIZE} ranks" in result.stdout
    assert f"step: compile {'on' if compiled else 'off'}" in result.stdout
    assert result.stdout.count("---- sample ----") == 1 and result.stdout.count("step 4: train loss") == 1
    assert os.listdir(tmp_path / "out") == ["ckpt.pt"]
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 4


def child_pids(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return sorted({int(child) for task in tasks.iterdir() for child in (task / "children").read_text().split()})


@pytest.mark.parametrize("interrupted", ["torchrun", "one rank"])
def test_ctrl_c_stops_every_rank_at_one_step_with_the_checkpoint_intact(tmp_path, interrupted):
    """Ctrl-C to torchrun, which passes it on to every rank; or to one rank only, which must not leave the others
    waiting in a collective it will never join. (Then torchrun, seeing that rank exit with status 130, ends the
    others with SIGTERM if they are slower to exit: its rule for a failed rank.)"""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("finding torchrun's ranks (to signal one, or to end them if they hang) needs /proc")
    out_dir = tmp_path / "out"
    command = torchrun_command(write_text(tmp_path), out_dir, "--max-iters", "1000000", "--eval-interval", "5")
    torchrun = subprocess.Popen(command, cwd=REPO, env=TORCHRUN_ENV, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out_dir / "ckpt.pt").exists() and torchrun.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = child_pids(torchrun.pid)
    os.kill(torchrun.pid if interrupted == "torchrun" else ranks[-1], signal.SIGINT)
    try:
        _, stderr = torchrun.communicate(timeout=60)
    finally:
        for pid in [torchrun.pid, *ranks]:  # a rank that hangs would outlive torchrun
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    said = re.findall(r"^interrupted at step \d+; the last checkpoint \(step (\d+)\) is in", stderr, re.MULTILINE)
    assert len(said) == 1, stderr  # rank 0 says it, once
    assert load_checkpoint(out_dir / "ckpt.pt")["step"] == int(said[0])
    assert "terminate called" not in stderr and "SIGABRT" not in stderr, stderr


def rank_draws(out_dir, monkeypatch, world_size, max_iters, resume=False):
    """{(rank, step): the window starts of that step's batch} of every rank of `world_size`, drawn by gpt.train's
    own training loop, each rank run in turn in this process: the DDP wrapper, the collectives and the loss
    estimates (which draw batches of their own) stubbed out, as the batches depend on none of them. The text has
    distinct characters, so a window's first token id is its start. With `resume`, every rank continues from the
    checkpoint in out_dir (rank 0, which overwrites it, last)."""
    import gpt.train
    from gpt.data import TextDataset

    out_dir.mkdir(exist_ok=True)
    data = out_dir / "distinct.txt"
    data.write_text("".join(chr(0x100 + i) for i in range(600)), encoding="utf-8")
    args = gpt.train.parse_args(["--data", str(data), "--out-dir", str(out_dir), "--device", "cpu", "--n-embd", "8",
                                 "--n-head", "2", "--n-layer", "1", "--block-size", "8", "--batch-size", "4",
                                 "--max-iters", str(max_iters), "--eval-interval", "3", "--eval-iters", "1"]
                                + (["--resume"] if resume else []))  # fmt: skip
    draws = []
    real_get_batch = TextDataset.get_batch
    monkeypatch.setattr(TextDataset, "get_batch", lambda *a, **k: draws.append(real_get_batch(*a, **k)) or draws[-1])
    monkeypatch.setattr(gpt.train, "wrap_ddp", lambda model, device: model)
    monkeypatch.setattr(gpt.train, "mean_across_ranks", lambda value, runtime: value)
    monkeypatch.setattr(gpt.train, "estimate_loss", lambda *a, **k: {"train": 0.0, "val": 0.0})
    monkeypatch.setattr(gpt.train.dist, "barrier", lambda: None)
    start = load_checkpoint(out_dir / "ckpt.pt")["step"] if resume else 0
    by_rank_and_step = {}
    for rank in reversed(range(world_size)):
        draws.clear()
        gpt.train._train(args, gpt.train.Runtime(torch.device("cpu"), rank, world_size))
        for step, (x, _) in zip(range(start, max_iters), draws, strict=True):
            by_rank_and_step[rank, step] = tuple(x[:, 0].tolist())
    return by_rank_and_step


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_draws_its_own_batch_at_every_step_and_again_after_a_resume(tmp_path, monkeypatch, world_size):
    """No two (rank, step) pairs draw the same batch (a seed of seed + rank + step would give rank 1 at step s
    rank 0's batch of step s + 1: every batch seen twice); a run resumed at step 3 draws at each later step the
    batch the uninterrupted run drew there, on every rank."""
    straight = rank_draws(tmp_path / "straight", monkeypatch, world_size, max_iters=6)
    assert len(straight) == world_size * 6 and len(set(straight.values())) == len(straight)
    rank_draws(tmp_path / "resumed", monkeypatch, world_size, max_iters=3)
    resumed = rank_draws(tmp_path / "resumed", monkeypatch, world_size, max_iters=6, resume=True)
    assert resumed == {(rank, step): batch for (rank, step), batch in straight.items() if step >= 3}
