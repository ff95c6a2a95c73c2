"""Input checks shared by every op: a clear TypeError (a wrong type) or ValueError (a wrong value) naming the
argument, raised before anything reaches Triton."""

import numbers

import torch
import triton

from ._gpu import device_arch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Read once: Triton fixes the mode when it is imported, and torch.compile cannot trace the lookup.
TRITON_INTERPRETS = triton.knobs.runtime.interpret
_KIND_NAMES = {int: "an int", numbers.Real: "a real number"}
# The types a number of each kind usually has, tested first: isinstance against an abstract class is slow.
_PLAIN_TYPES = {int: (int,), numbers.Real: (float, int)}


def check_tensor(name, tensor, *, ndim=None, min_ndim=None, dtypes=SUPPORTED_DTYPES):
    """Check that `tensor` is a tensor of a supported floating dtype and (optionally) rank."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {tensor.dtype}; supported dtypes are {names}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {tensor.dim()} (shape {tuple(tensor.shape)})")
    if min_ndim is not None and tensor.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(tensor.shape)}")


def check_same_device_and_dtype(reference_name, reference, **others):
    """Check that every tensor in `others` (name=tensor) lives on the device and has the dtype of `reference`."""
    for name, tensor in others.items():
        if tensor.device != reference.device:
            raise ValueError(f"{name} is on {tensor.device} but {reference_name} is on {reference.device}")
        if tensor.dtype != reference.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but {reference_name} has dtype {reference.dtype}")


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_number(name, value, kind, is_valid, expected):
    """`value` must be a number of `kind`, int or numbers.Real (a bool is neither; else TypeError), for which
    is_valid(value) holds (else ValueError, saying it must be `expected`)."""
    if type(value) not in _PLAIN_TYPES[kind] and (isinstance(value, bool) or not isinstance(value, kind)):
        raise TypeError(f"{name} must be {_KIND_NAMES[kind]}, got {type(value).__name__}")
    if not is_valid(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def may_synchronise(tensor):
    """Whether a check may read `tensor`'s values on the host: not while torch.compile traces (the read would break
    the graph) nor while a CUDA graph is being captured (a synchronisation is an error there)."""
    return not (torch.compiler.is_compiling() or (tensor.is_cuda and torch.cuda.is_current_stream_capturing()))


def check_runnable(name, tensor):
    """Check that the kernels can run on `tensor`'s device: a CUDA GPU of compute capability 8.0 or newer (older
    ones have too little shared memory for the tiles, which are checked for sm_80 and up), or CPU under Triton's
    interpreter (TRITON_INTERPRET=1 set before triton is imported)."""
    if tensor.is_cuda:
        if device_arch(tensor.device) < 80:
            raise ValueError(
                f"{name} is on {torch.cuda.get_device_name(tensor.device)} (compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(tensor.device)))}); the kernels need compute "
                "capability 8.0 or newer (Ampere, Ada, Hopper)"
            )
        return
    if tensor.is_cpu and TRITON_INTERPRETS:
        return
    raise ValueError(
        f"{name} is on {tensor.device}; the kernels run on CUDA tensors, or on CPU tensors under Triton's "
        f"interpreter (TRITON_INTERPRET=1 set before triton is imported)"
    )
