"""What gpt-train and gpt-sample share on the command line: the device and its CPU threads, the backends that
device can run, and bad input reported as one line."""

import argparse
import os
import re
import sys

import torch

# Torch runs its operators on one thread per core by default. The models trained and sampled on a CPU here are
# small, so a second thread gains little, and on a machine that other work shares the threads wait on each other:
# on 2 busy cores, gpt-sample and the cpu preset ran up to 6x slower with 2 threads than with 1 (docs/training.md).
DEFAULT_CPU_THREADS = 1


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    parser.add_argument("--threads", type=int, help=f"CPU threads for torch's operators (default on a CPU: "
                        f"{DEFAULT_CPU_THREADS}, or OMP_NUM_THREADS when set; on a GPU: torch's default)")  # fmt: skip


def check_device_arguments(args: argparse.Namespace, prog: str) -> None:
    """Exit with a one-line error unless --device names a device this machine has and --threads is positive."""
    if args.threads is not None and args.threads < 1:
        exit_with_error(prog, f"--threads must be positive, got {args.threads}")
    if args.device is None:
        return
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", args.device)
    if match is None:
        exit_with_error(prog, f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            exit_with_error(prog, f"--device {args.device} requested but CUDA is not available")
        index = match.group(1)
        if index is not None and int(index) >= torch.cuda.device_count():
            exit_with_error(prog, f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_cpu_threads(threads: int | None, device: torch.device) -> None:
    """Torch's thread count: `threads` when given; else DEFAULT_CPU_THREADS for a CPU run, unless the environment
    chose already (OMP_NUM_THREADS, which torchrun also sets); else torch's default."""
    if threads is None and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        threads = DEFAULT_CPU_THREADS
    if threads is not None:
        torch.set_num_threads(threads)


def resolve_backends(attention: str, layernorm: str, device, log=print) -> tuple[str, str]:
    """The backends to build the model with on `device`: Triton only trains on a GPU."""
    if torch.device(device).type != "cuda" and "triton" in (attention, layernorm):
        log(
            "Triton backends need a CUDA GPU: without one only Triton's CPU interpreter can run them, "
            "far too slowly to train. Using eager attention and layernorm."
        )
        return "eager", "eager"
    return attention, layernorm


def exit_with_error(prog: str, message: str):
    """Bad input: `prog: error: message` as one line on stderr, and exit status 2 (argparse's convention for
    usage errors, without repeating the usage text)."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.exit(2)
