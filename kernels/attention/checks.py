"""The checks of the attention functions' arguments (attention, attention_varlen, the dropout-mask helpers, and
decode_attention's heads and scale): a TypeError for a wrong type, a ValueError for a wrong value, each naming the
argument, before anything reaches Triton."""

import math
import numbers

import torch

from .._validate import (
    check_bool,
    check_number,
    check_runnable,
    check_same_device_and_dtype,
    check_tensor,
    may_synchronise,
)
from .tiles import MAX_HEAD_SIZE


def check_tensors(function, q, k, v, ndim):
    """q, k and v (None for the mask helpers, which take no values): tensors of one supported dtype on one runnable
    device, dense (B, H, N, D) with ndim 4 or packed (total, H, D) with ndim 3, k and v alike, one head size,
    grouped-query heads, nothing empty."""
    tensors = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, t in tensors.items():
        check_tensor(name, t, ndim=ndim)
    others = tensors.copy()
    del others["q"]
    check_same_device_and_dtype("q", q, **others)
    check_runnable("q", q)
    q_shape, k_shape = q.shape, k.shape
    if v is not None and k_shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k_shape)} and {tuple(v.shape)}")
    if ndim == 4 and k_shape[0] != q_shape[0]:
        raise ValueError(f"{', '.join(tensors)} must agree in batch (dim 0), got {_shapes(tensors)}")
    if k_shape[-1] != q_shape[-1]:
        raise ValueError(f"{', '.join(tensors)} must have the same head size (last dim), got {q_shape[-1]} and "
                         f"{k_shape[-1]}")
    check_heads(function, q_shape[1], k_shape[1], q_shape[-1])  # (B, H, N, D) and packed (total, H, D) alike
    if min(q_shape) == 0 or (ndim == 4 and min(k_shape) == 0):
        raise ValueError(f"{', '.join(tensors)} must not be empty, got {_shapes(tensors)}")


def _shapes(tensors):
    return ", ".join(str(tuple(t.shape)) for t in tensors.values())


def check_heads(function, heads, kv_heads, head_dim, keys="k"):
    """q's heads a multiple of those of the keys (k, or k_cache), and a head size the kernels have tiles for."""
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"{function}: the query heads ({heads}) must be a multiple of the key/value heads "
                         f"({kv_heads}), as grouped-query attention needs (dim 1 of q and of {keys})")
    if head_dim > MAX_HEAD_SIZE:
        raise ValueError(f"head size {head_dim} is not supported; the largest is {MAX_HEAD_SIZE} (the last dim of "
                         "q)")


def check_band(causal, window):
    """(window_left, window_right) for the kernels, -1 for an unbounded side; causal bounds the right side at 0."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} (options after q, k, v are "
                        "keyword-only: attention(q, k, v, causal=..., dropout_p=..., scale=...))")
    well_typed = isinstance(window, (tuple, list)) and all(isinstance(w, int) and not isinstance(w, bool)
                                                           for w in window)
    if not well_typed or len(window) != 2 or min(window) < -1:
        expected = f"window must be (left, right), two ints >= -1 (-1: unbounded), got {window!r}"
        if not well_typed:
            raise TypeError(expected)
        raise ValueError(expected)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def check_dropout(dropout_p, n_q=0, n_k=0, name="dropout_p"):
    """A probability in [0, 1); with dropout, Nq * Nk < 2^31 (the longest sequences)."""
    check_number(name, dropout_p, numbers.Real, lambda p: 0.0 <= p < 1.0, "a number in [0, 1)")
    if dropout_p > 0 and n_q * n_k >= 2**31:
        raise ValueError(f"dropout needs Nq * Nk < 2**31 (its random stream is indexed per head), got {n_q} x {n_k}")


def check_scale(scale, name="scale"):
    if scale is not None:
        check_number(name, scale, numbers.Real, lambda s: math.isfinite(s) and s > 0,
                     "a finite positive number (or None)")


def check_seed(seed):
    if seed is not None:
        check_number("seed", seed, int, lambda s: 0 <= s < 2**31, "an int in [0, 2**31) (or None)")


def check_options(dropout_p, scale, seed, return_lse, n_q, n_k):
    """The options attention and attention_varlen share, after the band."""
    check_dropout(dropout_p, n_q, n_k)
    check_scale(scale)
    check_seed(seed)
    check_bool("return_lse", return_lse)


def check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None):
    """cu_seqlens: int32 vectors of B + 1 non-decreasing offsets from 0 to the packed length, on the tensors'
    device; max_seqlen (not given to the mask helpers) a positive int, at least the longest sequence. Reading the
    offsets costs one device synchronisation, so it is skipped where that may not happen (may_synchronise)."""
    sides = (("q", cu_seqlens_q, q, max_seqlen_q), ("k", cu_seqlens_k, k, max_seqlen_k))
    for side, cu, _, max_seqlen in sides:
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32:
            got = cu.dtype if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise TypeError(f"cu_seqlens_{side} must be an int32 tensor of batch + 1 offsets, got {got}")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"cu_seqlens_{side} must be a vector of batch + 1 offsets, got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"cu_seqlens_{side} is on {cu.device} but q is on {q.device}")
        if max_seqlen is not None:
            check_number(f"max_seqlen_{side}", max_seqlen, int, lambda n: n >= 1, "a positive int")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got {cu_seqlens_q.numel() - 1}"
                         f" and {cu_seqlens_k.numel() - 1} sequences")
    if not may_synchronise(q):
        return
    for side, cu, packed, max_seqlen in sides:
        offsets = cu.tolist()
        lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        if offsets[0] != 0 or min(lengths) < 0:
            raise ValueError(f"cu_seqlens_{side} must start at 0 and never decrease, got {offsets}")
        if offsets[-1] != packed.shape[0]:
            raise ValueError(f"cu_seqlens_{side} must end at the packed length {packed.shape[0]}, got {offsets[-1]}")
        if max_seqlen is not None and max(lengths) > max_seqlen:
            raise ValueError(f"the longest sequence of cu_seqlens_{side} has {max(lengths)} rows, more than "
                             f"max_seqlen_{side} {max_seqlen}")
