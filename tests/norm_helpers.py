"""Inputs of the norm tests (test_layer_norm.py, test_rms_norm.py): float64 draws, leaves in the dtype under test,
readable shape ids."""

import torch


def shape_id(value):
    """A shape as 37x384 in the test ids."""
    return "x".join(map(str, value)) if isinstance(value, tuple) else None


def random64(shape, generator, scale=1.0, offset=0.0):
    """Normal draws in float64, scaled and shifted (a large offset is the cancellation case)."""
    return torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset


def leaf(tensor, dtype, device):
    """A fresh leaf copy of tensor in dtype on device (None stays None)."""
    return None if tensor is None else tensor.detach().to(device=device, dtype=dtype).clone().requires_grad_()
