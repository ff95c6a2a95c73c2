"""The public attention functions: input checks, the softmax scale and the dropout seed, then the operators."""

import math

import torch
import triton

from .._validate import TRITON_INTERPRETS, check_runnable, check_same_device_and_dtype, check_tensor
from .forward import dropout_mask_kernel
from .ops import AttentionFunction, attention_dropout_seed, seed_value
from .tiles import MAX_HEAD_SIZE


def _check_inputs(q, k, v, dropout_p, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_same_device_and_dtype("q", q, k=k, v=v)
    check_runnable("q", q)
    (B, H, N_Q, D), (Bk, Hk, N_K, Dk), (Bv, Hv, N_V, Dv) = q.shape, k.shape, v.shape
    if not (B == Bk == Bv and H == Hk == Hv):
        raise ValueError(
            f"q, k, v must agree in batch and heads (dims 0 and 1), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not D == Dk == Dv:
        raise ValueError(f"q, k, v must have the same head size (dim 3), got {D}, {Dk}, {Dv}")
    if N_K != N_V:
        raise ValueError(f"k and v must have the same sequence length (dim 2), got {N_K} and {N_V}")
    if D > MAX_HEAD_SIZE:
        raise ValueError(f"head size {D} is not supported; the largest is {MAX_HEAD_SIZE}")
    if min(B, H, N_Q, N_K, D) == 0:
        raise ValueError(f"q, k, v must not be empty, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and N_Q * N_K >= 2**31:
        raise ValueError(f"dropout needs Nq * Nk < 2**31 (its random stream is indexed per head), got {N_Q} x {N_K}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale}")


def _seed_tensor(dropout_p, seed):
    """The seed operand of the operators: None without dropout; else the given seed, or a fresh one drawn from
    torch's default CPU generator."""
    if dropout_p == 0:
        return None
    if seed is None:
        return attention_dropout_seed()
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    return torch.tensor([seed], dtype=torch.int64)


def attention(q, k, v, causal=True, dropout_p=0.0, scale=None, seed=None):
    """Scaled dot-product attention, fused: softmax(scale * q k^T [causal mask]) with dropout, times v.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D); fp16, bf16 or fp32 on CUDA (or CPU under TRITON_INTERPRET=1);
    any strides; D up to 256. Returns (B, H, Nq, D) in the input dtype.
    causal: query i sees keys j <= i + Nk - Nq (bottom-right aligned; the lower triangle when Nq == Nk).
        A query that sees no key (Nq > Nk) outputs 0 and gets zero gradients.
    dropout_p: probability of dropping each attention weight (kept ones are scaled by 1 / (1 - dropout_p)).
    scale: the softmax scale, D ** -0.5 when None.
    seed: the dropout seed in [0, 2**31); when None (and dropout_p > 0) it is drawn from torch's default CPU
        generator, so `torch.manual_seed` makes the call reproducible. `attention_dropout_mask` returns the mask.
    """
    _check_inputs(q, k, v, dropout_p, scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if TRITON_INTERPRETS and q.dtype == torch.bfloat16:
        # Triton's interpreter multiplies bf16 tiles wrongly: run the fp32 kernels and round the result to bf16.
        return attention(q.float(), k.float(), v.float(), causal, dropout_p, scale, seed).to(torch.bfloat16)
    seed = _seed_tensor(dropout_p, seed)
    out, _ = AttentionFunction.apply(q, k, v, bool(causal), float(dropout_p), float(scale), seed)
    return out


def attention_dropout_mask(q, k, dropout_p, seed=None):
    """The boolean keep-mask (B, H, Nq, Nk) that `attention(q, k, ..., dropout_p=dropout_p, seed=seed)` uses.

    With seed=None the seed is drawn from torch's generator exactly as `attention` draws it, so
        torch.manual_seed(s); out = attention(q, k, v, dropout_p=p)
        torch.manual_seed(s); keep = attention_dropout_mask(q, k, p)
    gives the mask of that call. Meant for tests and inspection: it materialises Nq x Nk per head.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_same_device_and_dtype("q", q, k=k)
    check_runnable("q", q)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    B, H, N_Q, _ = q.shape
    N_K = k.shape[2]
    seed = seed_value(_seed_tensor(dropout_p, seed))
    mask = torch.empty((B, H, N_Q, N_K), device=q.device, dtype=torch.bool)
    block = 64 if q.is_cuda else 32
    grid = (triton.cdiv(N_Q, block), triton.cdiv(N_K, block), B * H)
    dropout_mask_kernel[grid](mask, H, N_Q, N_K, float(dropout_p), seed, BLOCK_M=block, BLOCK_N=block)
    return mask
