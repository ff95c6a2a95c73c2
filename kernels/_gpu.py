"""What the kernels know about GPUs: the architectures their tiles are made and checked for, and a device's own."""

import torch

# The compute capabilities (major * 10 + minor) the launch tables are written for and the compile report checks,
# Hopper first. Every other architecture runs the tiles of the general case, written for sm_80.
CHECKED_ARCHS = (90, 80)


def device_arch(device: torch.device) -> int:
    """The compute capability of a CUDA device as one number: 90 for sm_90."""
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor
