"""gpt-train: train the character-level GPT on the default corpus or any UTF-8 text file.

    gpt-train --preset cpu                                # ~2 minutes on 2 CPU cores
    gpt-train --preset reference --data input.txt         # the reference model, on a GPU
    torchrun --nproc_per_node=4 -m gpt.train --preset reference

On a CUDA GPU it trains fast by default: this package's Triton kernels, bf16 autocast (fp16 with a GradScaler where
the card has no bf16), fused AdamW and TF32; on a CPU, the eager modules in fp32. --attention, --layernorm, --dtype,
--compile and --cuda-graphs override the defaults, and the first log lines say what was chosen and why
(gpt/step.py). The log reports tokens/s, and MFU on a GPU it knows (gpt/throughput.py).

Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel: every rank draws its own
batches, gradients are averaged by DDP, and only rank 0 logs, evaluates, writes checkpoints and samples.
"""

import argparse
import contextlib
import gc
import inspect
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  imported before any process group exists: see leave_process_group
from torch.nn.parallel import DistributedDataParallel

from gpt.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from gpt.cli import add_device_arguments, check_device_arguments, default_device, exit_with_error, set_cpu_threads
from gpt.data import CharTokenizer, TextDataset, load_text
from gpt.model import ATTENTION_BACKENDS, GPT, LAYERNORM_BACKENDS, GPTConfig
from gpt.sample import default_prompt, sample_text
from gpt.step import DTYPES, SettingsError, TrainStep, load_optimizer_state, make_optimizer, resolve_settings
from gpt.throughput import SpeedReport, Throughput

# Values a preset sets; any flag given explicitly on the command line overrides them.
PRESETS = {
    # A tiny model that visibly learns in about two minutes on 2 CPU cores.
    "cpu": dict(
        n_embd=64, n_head=4, n_layer=3, block_size=64, dropout=0.0,
        batch_size=32, lr=2e-3, max_iters=3000, eval_interval=500, eval_iters=20,
    ),
    # The reference design (10.8M parameters with a 65-character vocabulary): a GPU run.
    "reference": dict(
        n_embd=384, n_head=6, n_layer=6, block_size=256, dropout=0.2,
        batch_size=64, lr=3e-4, max_iters=5000, eval_interval=500, eval_iters=200,
    ),
}  # fmt: skip
MODEL_KEYS = ("n_embd", "n_head", "n_layer", "block_size", "dropout")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpt-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, help="starting values for the flags below "
                   "(default: reference with a CUDA GPU, cpu without)")  # fmt: skip
    p.add_argument("--data", help="UTF-8 text file to train on (default: the Python standard library's sources)")
    p.add_argument("--out-dir", default="out", help="where the checkpoint goes (default: out)")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    add_device_arguments(p)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, help="(default: triton on a CUDA GPU, else eager; "
                   "sdpa is torch's scaled_dot_product_attention)")
    p.add_argument("--layernorm", choices=LAYERNORM_BACKENDS, help="(default: triton on a CUDA GPU, else eager, "
                   "torch's nn.LayerNorm)")
    p.add_argument("--dtype", choices=DTYPES, help="autocast precision of the forward; weights stay float32 (default: "
                   "bfloat16 on a GPU with bf16, float16 with a GradScaler on one without, float32 on a CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="run the model under "
                   "torch.compile(fullgraph=True) (default: off until bench.train measures it faster on the card)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, help="capture the whole training step as "
                   "one CUDA graph and replay it (default: off until bench.train measures it faster on the card)")
    p.add_argument("--n-embd", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-layer", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--batch-size", type=int, help="sequences per step (per rank under torchrun)")
    p.add_argument("--lr", type=float, help="AdamW learning rate")
    p.add_argument("--max-iters", type=int, help="total optimizer steps (a resumed run counts on from its checkpoint)")
    p.add_argument("--eval-interval", type=int, help="steps between loss estimates and checkpoints")
    p.add_argument("--eval-iters", type=int, help="batches per loss estimate")
    p.add_argument("--sample-tokens", type=int, default=500, help="characters in the sample printed at the end")
    args = p.parse_args(argv)
    if args.preset is None:
        args.preset = "reference" if torch.cuda.is_available() else "cpu"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch_size", "max_iters", "eval_interval", "eval_iters"):
        if getattr(args, key) < 1:
            exit_with_error(p.prog, f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if not args.lr > 0:
        exit_with_error(p.prog, f"--lr must be positive, got {args.lr}")
    if args.sample_tokens < 0:
        exit_with_error(p.prog, f"--sample-tokens must be non-negative, got {args.sample_tokens}")
    try:  # the model's own checks (n_embd divisible by n_head, dropout below 1, ...) before any data is read
        GPTConfig(vocab_size=1, **{key: getattr(args, key) for key in MODEL_KEYS})
    except ValueError as e:
        exit_with_error(p.prog, str(e))
    check_device_arguments(args, p.prog)
    return args


class InputError(Exception):
    """A file the command line names cannot be used (missing, empty, not text, not a checkpoint, ...):
    gpt-train reports it as one line, not as a traceback."""


@dataclass
class Runtime:
    """Where this process trains, and its place among the DDP ranks (rank 0 of 1 without torchrun)."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(requested_device=None) -> Runtime:
    """Pick the device; under torchrun (WORLD_SIZE > 1) also join the process group: NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        device = torch.device(requested_device) if requested_device else default_device()
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # what launches on the current device (Triton) follows the model
        return Runtime(device)
    rank = int(os.environ["RANK"])
    if torch.cuda.is_available() and requested_device in (None, "cuda"):
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    return Runtime(device, rank, world_size)


def leave_process_group() -> None:
    """Destroy the process group for real, its gloo worker threads joined, while Python is still fully alive.

    A worker thread finishes a collective a moment after the rank it serves has moved on, and then drops its
    reference to the collective's tensors. Dropping a tensor Python also knows needs the GIL; once the interpreter
    has begun to shut down, Python answers by ending the thread, the unwinding meets a C++ destructor, and the
    process aborts ("terminate called without an active exception"), so a finished run could exit -6. Freeing
    the group joins its worker threads first, but destroy_process_group frees it only when nothing else holds it:
    - the DDP wrapper holds it, and sits in a reference cycle, so only the garbage collector frees it;
    - torch.distributed.nn's functions take `group.WORLD` as a default argument, evaluated when the module is
      imported, and DDP's constructor imports it (through torch._dynamo). This file imports it first, before
      any group exists, so that it holds none.
    """
    gc.collect()
    dist.destroy_process_group()


def wrap_ddp(model: GPT, device: torch.device) -> DistributedDataParallel:
    # The only buffers are the causal masks, identical everywhere: no need to broadcast them each step
    # (and rank 0 can run the bare model for evaluation without a collective the other ranks would miss).
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers (the old name warns); 2.11 has only the old one.
    parameters = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **{no_buffer_sync: False})


def mean_across_ranks(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= runtime.world_size
    return value


def batch_generator(seed: int, runtime: Runtime, step: int) -> torch.Generator:
    """The random source for one step's batch: distinct for every (rank, step), and the same again
    after a resume, so a resumed run draws exactly the batches the uninterrupted run would have."""
    return torch.Generator().manual_seed(seed + runtime.rank + runtime.world_size * step)


@torch.no_grad()
def estimate_loss(model, dataset: TextDataset, batch_size: int, eval_iters: int, device, seed: int,
                  autocast=contextlib.nullcontext) -> dict:  # fmt: skip
    """Mean loss over `eval_iters` batches of each split; the same batches at every evaluation. `autocast()` is the
    training step's autocast context."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    losses = {}
    for split in ("train", "val"):
        total = 0.0
        for _ in range(eval_iters):
            x, y = dataset.get_batch(split, batch_size, device, generator)
            with autocast():
                total += model(x, y)[1].item()
        losses[split] = total / eval_iters
    model.train()
    return losses


class StopOnCtrlC:
    """While active, Ctrl-C (SIGINT) asks training to stop after the step it is on, instead of raising
    KeyboardInterrupt wherever the program happens to be. Under torchrun each rank gets the signal (from the
    terminal, or forwarded by torchrun) at its own point, and a rank stopped between two collectives would leave
    the others waiting in the next one; so the request travels with the step's loss (`requested` is summed across
    ranks with it) and every rank stops after the same step."""

    def __enter__(self):
        self.requested = False
        self._previous_handler = signal.signal(signal.SIGINT, self._request)
        return self

    def _request(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc_info):
        signal.signal(signal.SIGINT, self._previous_handler)


class ProgressBar:
    """One line on stderr, redrawn in place with a carriage return (at most ~10 times a second)."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width = total, width
        self.last_draw = time.perf_counter()
        self.line = ""

    def update(self, step: int, loss: float, speed: str = ""):
        """Redraw with the step, the loss and `speed` (tokens/s) when the last redraw is 0.1 s old or it is the
        last step."""
        now = time.perf_counter()
        if now - self.last_draw < 0.1 and step < self.total:
            return
        self.last_draw = now
        filled = self.width * step // max(self.total, 1)
        speed = f", {speed}" if speed else ""
        self._draw(f"{step}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}] loss {loss:.4f}{speed}")

    def write(self, message: str):
        """Print a log line on stdout without leaving a half-drawn bar behind it."""
        if self.line:
            self._write("\r" + " " * len(self.line) + "\r")
        print(message, flush=True)
        self._write(self.line)

    def close(self):
        if self.line:
            self._write("\n")
        self.line = ""

    def _draw(self, line: str):
        self._write("\r" + line.ljust(len(self.line)))
        self.line = line

    @staticmethod
    def _write(text: str):
        sys.stderr.write(text)
        sys.stderr.flush()


def train(args: argparse.Namespace) -> dict:
    """Run one training job; returns the loss history, the final sample, the checkpoint path, the model, and whether
    Ctrl-C stopped it early (then there is no sample). Under torchrun every rank leaves the process group once
    training is over, and rank 0 then samples alone."""
    runtime = setup_runtime(args.device)
    try:
        run = _train(args, runtime)
    finally:
        if runtime.distributed:
            leave_process_group()
    sample = None
    if runtime.is_main and not run["interrupted"]:
        tokenizer = run["tokenizer"]
        sample = sample_text(run["model"], tokenizer, default_prompt(tokenizer), args.sample_tokens, seed=args.seed)
        print("---- sample ----")
        print(sample)
    return {**run, "sample": sample}


def _train(args, runtime: Runtime) -> dict:
    log = print if runtime.is_main else (lambda *a, **k: None)
    checkpoint_path = Path(args.out_dir) / CHECKPOINT_NAME
    try:
        settings = resolve_settings(runtime.device, args.attention, args.layernorm, args.dtype, args.compile,
                                    args.cuda_graphs, log_fallback=log)  # fmt: skip
    except SettingsError as e:
        raise InputError(e) from e

    try:
        checkpoint = load_checkpoint(checkpoint_path, runtime.device) if args.resume else None
        if checkpoint is not None:
            # The checkpoint fixes the model's shape, its vocabulary and (unless --data says otherwise) its text.
            config = GPTConfig(**{**checkpoint["config"], "attention": settings.attention,
                                  "layernorm": settings.layernorm})  # fmt: skip
            tokenizer = CharTokenizer(checkpoint["vocab"])
            data_path = args.data if args.data is not None else checkpoint["args"].get("data")
            start_step = checkpoint["step"]
        else:
            config = None
            tokenizer = None
            data_path = args.data
            start_step = 0
        text = load_text(data_path)
        dataset = TextDataset(text, config.block_size if config else args.block_size, tokenizer)
    except (OSError, ValueError) as e:  # raised here only for what the files hold, each naming the problem
        raise InputError(e) from e
    tokenizer = dataset.tokenizer
    if config is None:
        config = GPTConfig(vocab_size=tokenizer.vocab_size, attention=settings.attention,
                           layernorm=settings.layernorm, **{k: getattr(args, k) for k in MODEL_KEYS})  # fmt: skip

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = GPT(config).to(runtime.device)  # float32 weights, whatever the autocast precision
    model.check_token_ids = False  # the batches are the tokenizer's: no device sync per step to re-check them
    optimizer = make_optimizer(model, args.lr, settings)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        load_optimizer_state(optimizer, checkpoint["optimizer"])
    torch.manual_seed(args.seed + runtime.rank)  # dropout masks differ per rank
    wrap = (lambda module: wrap_ddp(module, runtime.device)) if runtime.distributed else None
    train_step = TrainStep(model, optimizer, settings, runtime.device, wrap=wrap)
    if checkpoint is not None and checkpoint.get("scaler") and train_step.scaler.is_enabled():
        train_step.scaler.load_state_dict(checkpoint["scaler"])
    speed = SpeedReport(model, runtime.device, runtime.world_size)
    throughput = Throughput(args.batch_size * config.block_size * runtime.world_size)

    threads = torch.get_num_threads()
    device_name = (torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda"
                   else f"CPU, {threads} thread{'s' if threads > 1 else ''}")  # fmt: skip
    ddp_note = f", DDP over {runtime.world_size} ranks" if runtime.distributed else ""
    resume_note = f" (resumed from {checkpoint_path})" if checkpoint is not None else ""
    corpus = data_path or "Python standard library sources"
    log(f"device: {runtime.device} ({device_name}){ddp_note}")
    for line in settings.describe():
        log(line)
    log(speed.basis())
    log(f"data: {corpus} ({len(text):,} characters, vocabulary {tokenizer.vocab_size})")
    log(f"model: {model.num_parameters() / 1e6:.2f}M parameters, n_layer={config.n_layer}, n_head={config.n_head}, "
        f"n_embd={config.n_embd}, block_size={config.block_size}, dropout={config.dropout}")  # fmt: skip
    log(f"training: preset {args.preset}, batch_size={args.batch_size}, lr={args.lr}, "
        f"steps {start_step} -> {args.max_iters}{resume_note}")  # fmt: skip

    def make_checkpoint(step, losses):
        run_args = {**vars(args), "data": data_path}  # a resumed run reads the same text again
        return {"config": asdict(config), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": train_step.scaler.state_dict(), "step": step, "vocab": tokenizer.chars, "args": run_args,
                "losses": losses}  # fmt: skip

    def speed_note():
        rate = throughput.recent_tokens_per_s()
        return "" if rate is None else speed.describe(rate)

    history = []
    bar = ProgressBar(args.max_iters) if runtime.is_main else None
    step = start_step
    last_checkpoint = start_step if checkpoint is not None else None
    with StopOnCtrlC() as ctrl_c:
        while True:
            if runtime.is_main and (step % args.eval_interval == 0 or step >= args.max_iters):
                losses = estimate_loss(model, dataset, args.batch_size, args.eval_iters, runtime.device, args.seed,
                                       autocast=lambda: settings.autocast(runtime.device.type))  # fmt: skip
                history.append((step, losses))
                note = speed_note()
                bar.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                          + (f"; {note}" if note else ""))  # fmt: skip
                if step > start_step:
                    save_checkpoint(make_checkpoint(step, losses), checkpoint_path)
                    last_checkpoint = step
                throughput.restart()  # evaluating and writing the checkpoint are not training time
            if step >= args.max_iters:
                break
            generator = batch_generator(args.seed, runtime, step)
            x, y = dataset.get_batch("train", args.batch_size, runtime.device, generator)
            loss = train_step(x, y)
            stop_request = torch.tensor(float(ctrl_c.requested), device=loss.device)
            loss, stop_votes = mean_across_ranks(torch.stack([loss, stop_request]), runtime).tolist()
            step += 1
            throughput.step_done(timed=not train_step.warming_up)
            if not math.isfinite(loss):  # the same value on every rank, so every rank stops
                raise FloatingPointError(f"loss became {loss} at step {step}; try a lower --lr")
            if runtime.is_main:
                bar.update(step, loss, speed_note())
            if stop_votes > 0 and step < args.max_iters:  # on the last step, finishing is as quick as stopping
                break
    interrupted = step < args.max_iters

    if runtime.is_main:
        bar.close()
        rate = throughput.overall_tokens_per_s()
        if rate is not None:
            log(f"speed: {speed.describe(rate)}, over the {throughput.timed_steps} timed steps (evaluation and the "
                f"warm-up steps left out)")  # fmt: skip
        if interrupted and last_checkpoint is None:
            print(f"interrupted at step {step}, before the first checkpoint (due at step {args.eval_interval}): "
                  f"nothing was saved", file=sys.stderr)  # fmt: skip
        elif interrupted:
            print(f"interrupted at step {step}; the last checkpoint (step {last_checkpoint}) is in {checkpoint_path}; "
                  f"continue with --resume", file=sys.stderr)  # fmt: skip
        elif step > start_step:
            log(f"checkpoint: {checkpoint_path}")
    if runtime.distributed:
        dist.barrier()  # every rank leaves the group at once (NCCL's teardown is collective in some versions)
    return {"history": history, "checkpoint": checkpoint_path, "model": model, "tokenizer": tokenizer,
            "interrupted": interrupted, "settings": settings}  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    set_cpu_threads(args.threads, torch.device(args.device) if args.device else default_device())
    try:
        run = train(args)
    except InputError as e:
        exit_with_error("gpt-train", str(e))
    except KeyboardInterrupt:  # outside the training loop, which stops at a step instead (StopOnCtrlC)
        print("gpt-train: interrupted", file=sys.stderr)
        sys.exit(130)
    if run["interrupted"]:
        sys.exit(130)  # the shell's status for a program ended by Ctrl-C


if __name__ == "__main__":
    main()
