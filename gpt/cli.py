"""What gpt-train and gpt-sample share on the command line: the device, the backends that device can run, and
bad input reported as one line."""

import argparse
import re
import sys

import torch


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")


def check_device_arguments(args: argparse.Namespace, prog: str) -> None:
    """Exit with a one-line error unless --device names a device this machine has."""
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
