"""The public attention functions, attention and attention_varlen: the argument checks (checks.py), the layout
the kernels read, the softmax scale, the visible band and the dropout seed, then the operators. Every option
after the tensors is keyword-only, with FlashAttention's meanings."""

import math

import torch

from .checks import check_band, check_cu_seqlens, check_options, check_tensors
from .ops import attention_dropout_seed, attention_forward, readable

_LN_2 = math.log(2.0)


def attention(q, k, v, *, causal=True, dropout_p=0.0, scale=None, window=(-1, -1), seed=None, return_lse=False):
    """Scaled dot-product attention, fused: softmax(scale * q k^T, masked to each query's band) with dropout,
    times v.

    q: (B, H, Nq, D); k, v: (B, H_KV, Nk, D) with H a multiple of H_KV (grouped-query attention: query head h
        reads key/value head h // (H / H_KV); H_KV = 1 is multi-query attention). fp16, bf16 or fp32 on CUDA
        (compute capability 8.0 or newer), or on CPU under TRITON_INTERPRET=1; any strides; D up to 256.
    causal: query i sees keys j <= i + Nk - Nq (bottom-right aligned; the lower triangle when Nq == Nk).
    window: (left, right), a sliding window: query i sees keys i + Nk - Nq - left <= j <= i + Nk - Nq + right,
        -1 for an unbounded side; with causal the right side is at most 0. Key blocks outside the window are
        skipped, so the cost grows with N x window, not N^2.
    A query that sees no key outputs 0 and gets zero gradients.
    dropout_p: probability of dropping each attention weight (kept ones are scaled by 1 / (1 - dropout_p)).
    scale: the softmax scale, D ** -0.5 when None.
    seed: the dropout seed in [0, 2**31); when None (and dropout_p > 0) it is drawn from torch's generator for the
        inputs' device, so `torch.manual_seed` makes the call reproducible. `attention_dropout_mask` returns the
        mask.
    return_lse: also return the log-sum-exp of each query row's scaled scores, (B, H, Nq) fp32, natural log,
        -inf for a row that sees no key (what split-KV and ring attention combine partial results by).
    Returns out, (B, H, Nq, D) in the input dtype, or (out, lse).
    """
    check_tensors("attention", q, k, v, ndim=4)
    window_left, window_right = check_band(causal, window)
    check_options(dropout_p, scale, seed, return_lse, q.shape[2], k.shape[2])
    q, k, v = (readable(t, t.stride(2), t.shape[2], t.contiguous) for t in (q, k, v))
    out, lse = attention_forward(q, k, v, None, None, q.shape[2], k.shape[2], window_left, window_right,
                                 float(dropout_p), softmax_scale(scale, q.shape[-1]), seed_tensor(dropout_p, seed, q))
    return (out, _natural_log(lse)) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=True,
                     dropout_p=0.0, scale=None, window=(-1, -1), seed=None, return_lse=False):
    """Attention over a batch of sequences of different lengths packed one after another, without padding:
    FlashAttention's flash_attn_varlen_func.

    q: (total_q, H, D); k, v: (total_k, H_KV, D): the batch's sequences back to back.
    cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) on the tensors' device, the cumulative lengths: sequence b is rows
        [cu_seqlens[b], cu_seqlens[b + 1]) (so cu_seqlens[0] = 0 and cu_seqlens[B] = total). Lengths may be 0.
    max_seqlen_q, max_seqlen_k: the longest sequence of each (they size the launch).
    Each sequence attends within itself; causal, window, dropout_p, scale, seed mean what they mean in
    `attention`, per sequence (causal aligned bottom-right in each). No work is spent past a sequence's end.
    return_lse: also return the log-sum-exp, (H, total_q) fp32 (FlashAttention's varlen layout).
    Returns out, (total_q, H, D) in the input dtype, or (out, lse).
    """
    check_tensors("attention_varlen", q, k, v, ndim=3)
    window_left, window_right = check_band(causal, window)
    check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    check_options(dropout_p, scale, seed, return_lse, max_seqlen_q, max_seqlen_k)
    q = readable(q, q.stride(0), max_seqlen_q, lambda: _heads_apart(q))
    k, v = (readable(t, t.stride(0), max_seqlen_k, lambda t=t: _heads_apart(t)) for t in (k, v))
    out, lse = attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                                 window_right, float(dropout_p), softmax_scale(scale, q.shape[-1]),
                                 seed_tensor(dropout_p, seed, q))
    return (out, _natural_log(lse)) if return_lse else out


def softmax_scale(scale, head_dim):
    """The softmax scale the operators take: `scale`, or D ** -0.5 when None."""
    return float(head_dim**-0.5 if scale is None else scale)


def seed_tensor(dropout_p, seed, like):
    """The seed operand of the operators: None without dropout; else the given seed (checked), or a fresh one drawn
    from torch's generator for `like`'s device, as a one-element int64 tensor on that device. A given seed is
    filled in on the device (torch.tensor would copy it from the host, which waits for the device and cannot be
    captured in a CUDA graph)."""
    if dropout_p == 0:
        return None
    if seed is None:
        return attention_dropout_seed(like)
    return torch.full((1,), seed, dtype=torch.int64, device=like.device)


def _heads_apart(packed):
    """A packed (total, H, D) tensor laid out head by head, (H, total, D) in memory: a row stride of D."""
    return packed.transpose(0, 1).contiguous().transpose(0, 1)


def _natural_log(lse):
    """The kernels' log2-domain LSE (+inf for a row that sees no key) as a natural log (-inf for such a row)."""
    return torch.where(torch.isinf(lse), float("-inf"), lse * _LN_2)
