"""What the kernels know about GPUs: the architectures their tiles are made and checked for, and a device's own."""

import contextlib
import functools

import torch

# The compute capabilities (major * 10 + minor) the launch tables are written for and the compile report compiles,
# Hopper first. Every other architecture from 8.0 up runs the tiles of the general case, written for sm_80;
# sm_86 and sm_89 (RTX 30xx and 40xx, A10, L4) run the same instructions with less shared memory, and the report
# checks sm_80's compiles against their limit too. Older GPUs are refused (_validate.check_runnable).
CHECKED_ARCHS = (90, 80)
ARCHS_RUNNING_SM80_CODE = (86, 89)


@functools.lru_cache(maxsize=None)
def device_arch(device: torch.device) -> int:
    """The compute capability of a CUDA device as one number: 90 for sm_90. Asked once per device: the launchers
    ask on every launch."""
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device, asked once per device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_device(tensor: torch.Tensor):
    """The context a launch for `tensor` runs in: Triton launches on the current CUDA device and stream, which
    need not be the tensor's (tensors on cuda:1 while cuda:0 is current), so the tensor's device is made current.
    CPU tensors (Triton's interpreter) need none."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
