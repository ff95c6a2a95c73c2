"""DistributedDataParallel on CPU with gloo: one DDP step over two ranks equals one single-process step on
the combined batch, leaving the process group really ends it, and `torchrun -m gpt.train` trains with only
rank 0 logging and checkpointing, every rank exiting cleanly."""

import gc
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpt.checkpoint import load_checkpoint
from gpt.model import GPT, GPTConfig
from gpt.train import leave_process_group, mean_across_ranks, setup_runtime, train_step, wrap_ddp

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
    trained = wrap_ddp(model, ddp_device) if ddp_device is not None else model
    loss = train_step(trained, OPTIMIZERS[optimizer_name](model.parameters()), x, y)
    return model, loss


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


def test_torchrun_trains_with_rank_0_logging_and_checkpointing(tmp_path):
    data = tmp_path / "input.txt"
    data.write_text("to be, or not to be, that is the question:\n" * 30, encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
               "-m", "gpt.train", "--data", str(data), "--out-dir", str(tmp_path / "out"), "--device", "cpu",
               "--n-embd", "16", "--n-head", "2", "--n-layer", "1", "--block-size", "16", "--batch-size", "4",
               "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "10"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr, result.stderr
    assert f"DDP over {WORLD_SIZE} ranks" in result.stdout
    assert result.stdout.count("---- sample ----") == 1 and result.stdout.count("step 4: train loss") == 1
    assert os.listdir(tmp_path / "out") == ["ckpt.pt"]
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 4
