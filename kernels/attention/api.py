"""The public attention functions: input checks, the layout the kernels read, the softmax scale, the visible band
and the dropout seed, then the operators. Every option after the tensors is keyword-only, with FlashAttention's
meanings."""

import math
import numbers

import torch
import triton

from .._gpu import launch_device
from .._validate import TRITON_INTERPRETS, check_runnable, check_same_device_and_dtype, check_tensor
from .forward import dropout_mask_kernel
from .ops import attention_dropout_seed, attention_forward, rows_fit
from .ops import decode_attention as decode_attention_op
from .tiles import MAX_DECODE_SPLITS, MAX_HEAD_SIZE

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
    _check_tensors("attention", q, k, v, ndim=4)
    B, H, N_Q, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k, v must agree in batch (dim 0), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    window_left, window_right = _band(causal, window)
    _check_options(dropout_p, scale, return_lse, q.shape[2], k.shape[2])
    if TRITON_INTERPRETS and q.dtype == torch.bfloat16:
        return _through_fp32(attention, q, k, v, causal=causal, dropout_p=dropout_p, scale=scale, window=window,
                             seed=seed, return_lse=return_lse)
    q, k, v = (_readable(t, t.stride(2), t.shape[2], t.contiguous) for t in (q, k, v))
    out, lse = attention_forward(q, k, v, None, None, N_Q, k.shape[2], window_left, window_right, float(dropout_p),
                                 _scale(scale, D), _seed_tensor(dropout_p, seed, q))
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
    _check_tensors("attention_varlen", q, k, v, ndim=3)
    window_left, window_right = _band(causal, window)
    _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_options(dropout_p, scale, return_lse, max_seqlen_q, max_seqlen_k)
    if TRITON_INTERPRETS and q.dtype == torch.bfloat16:
        return _through_fp32(attention_varlen, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             causal=causal, dropout_p=dropout_p, scale=scale, window=window, seed=seed,
                             return_lse=return_lse)
    q = _readable(q, q.stride(0), max_seqlen_q, lambda: _heads_apart(q))
    k, v = (_readable(t, t.stride(0), max_seqlen_k, lambda t=t: _heads_apart(t)) for t in (k, v))
    out, lse = attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                                 window_right, float(dropout_p), _scale(scale, q.shape[-1]),
                                 _seed_tensor(dropout_p, seed, q))
    return (out, _natural_log(lse)) if return_lse else out


def attention_dropout_mask(q, k, dropout_p, *, seed=None):
    """The boolean keep-mask (B, H, Nq, Nk) that `attention(q, k, ..., dropout_p=dropout_p, seed=seed)` uses.

    With seed=None the seed is drawn from torch's generator exactly as `attention` draws it, so
        torch.manual_seed(s); out = attention(q, k, v, dropout_p=p)
        torch.manual_seed(s); keep = attention_dropout_mask(q, k, p)
    gives the mask of that call. Meant for tests and inspection: it materialises Nq x Nk per head.
    """
    _check_mask_inputs(q, k, dropout_p, ndim=4)
    B, H, N_Q, _ = q.shape
    return _dropout_masks(_seed_tensor(dropout_p, seed, q), B, H, [(0, N_Q, k.shape[2])], dropout_p, q.device)[0]


def attention_varlen_dropout_mask(q, k, cu_seqlens_q, cu_seqlens_k, dropout_p, *, seed=None):
    """The keep-masks `attention_varlen(q, k, ..., dropout_p=dropout_p, seed=seed)` uses: a list with one boolean
    (H, Nq_b, Nk_b) mask per sequence b. Drawn like `attention_dropout_mask`."""
    _check_mask_inputs(q, k, dropout_p, ndim=3)
    lengths_q = torch.diff(cu_seqlens_q).tolist()
    lengths_k = torch.diff(cu_seqlens_k).tolist()
    sequences = [(b, n_q, n_k) for b, (n_q, n_k) in enumerate(zip(lengths_q, lengths_k))]
    masks = _dropout_masks(_seed_tensor(dropout_p, seed, q), 1, q.shape[1], sequences, dropout_p, q.device)
    return [mask[0] for mask in masks]


# --------------------------------------------------------------------------------------------------------------
# Checks: a clear error naming the problem, before anything reaches Triton


def _check_mask_inputs(q, k, dropout_p, ndim):
    for name, t in (("q", q), ("k", k)):
        check_tensor(name, t, ndim=ndim)
    check_same_device_and_dtype("q", q, k=k)
    check_runnable("q", q)
    _check_dropout(dropout_p)


def _check_tensors(function, q, k, v, ndim):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=ndim)
    check_same_device_and_dtype("q", q, k=k, v=v)
    check_runnable("q", q)
    heads, kv_heads, D = q.shape[1], k.shape[1], q.shape[-1]  # (B, H, N, D) and packed (total, H, D) alike
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-1] != D:
        raise ValueError(f"q, k, v must have the same head size (last dim), got {D} and {k.shape[-1]}")
    _check_heads(function, heads, kv_heads, D)
    if min(q.shape) == 0 or (ndim == 4 and min(k.shape) == 0):
        raise ValueError(f"q, k, v must not be empty, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def _check_heads(function, heads, kv_heads, head_dim):
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"{function}: the query heads ({heads}) must be a multiple of the key/value heads "
                         f"({kv_heads}), as grouped-query attention needs")
    if head_dim > MAX_HEAD_SIZE:
        raise ValueError(f"head size {head_dim} is not supported; the largest is {MAX_HEAD_SIZE}")


def _band(causal, window):
    """(window_left, window_right) for the kernels, -1 for an unbounded side; causal bounds the right side at 0."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} (options after q, k, v are "
                        "keyword-only: attention(q, k, v, causal=..., dropout_p=..., scale=...))")
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
        raise ValueError(f"window must be (left, right), two ints >= -1 (-1: unbounded), got {window!r}")
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def _check_dropout(dropout_p):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")


def _check_options(dropout_p, scale, return_lse, n_q, n_k):
    _check_dropout(dropout_p)
    if dropout_p > 0 and n_q * n_k >= 2**31:
        raise ValueError(f"dropout needs Nq * Nk < 2**31 (its random stream is indexed per head), got {n_q} x {n_k}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")


def _check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """cu_seqlens: int32 vectors of B + 1 non-decreasing offsets from 0 to the packed length, on the tensors'
    device; max_seqlen at least the longest sequence. Reading the offsets costs one device synchronisation, so
    it is skipped while torch.compile traces or a CUDA graph is being captured."""
    sides = (("cu_seqlens_q", cu_seqlens_q, q, max_seqlen_q), ("cu_seqlens_k", cu_seqlens_k, k, max_seqlen_k))
    for name, cu, packed, max_seqlen in sides:
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            got = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise TypeError(f"{name} must be an int32 vector of batch + 1 offsets, got {got}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
            raise ValueError(f"max_seqlen for {name} must be a positive int, got {max_seqlen!r}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got {cu_seqlens_q.numel() - 1}"
                         f" and {cu_seqlens_k.numel() - 1} sequences")
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    for name, cu, packed, max_seqlen in sides:
        offsets = cu.tolist()
        lengths = [b - a for a, b in zip(offsets, offsets[1:])]
        if offsets[0] != 0 or min(lengths) < 0:
            raise ValueError(f"{name} must start at 0 and never decrease, got {offsets}")
        if offsets[-1] != packed.shape[0]:
            raise ValueError(f"{name} must end at the packed length {packed.shape[0]}, got {offsets[-1]}")
        if max(lengths) > max_seqlen:
            raise ValueError(f"the longest sequence of {name} has {max(lengths)} rows, more than max_seqlen "
                             f"{max_seqlen}")


# --------------------------------------------------------------------------------------------------------------
# What the operators get


def _readable(t, row_stride, n_rows, copy):
    """t as the kernels read it: unchanged when its last dimension is contiguous and a sequence's rows lie within
    32-bit offsets of each other, else `copy()`: a layout with each head's rows together (the kernels' offsets
    inside a sequence are 32-bit). Too long a sequence even then is an error."""
    if rows_fit(t, row_stride, n_rows):
        return t
    t = copy()
    row_stride = t.stride(-2) if t.dim() == 4 else t.stride(0)
    if not rows_fit(t, row_stride, n_rows):
        raise ValueError(f"a sequence of {n_rows} rows of {t.shape[-1]} elements spans 2**31 elements or more, "
                         "beyond the kernels' 32-bit offsets")
    return t


def _heads_apart(packed):
    """A packed (total, H, D) tensor laid out head by head, (H, total, D) in memory: a row stride of D."""
    return packed.transpose(0, 1).contiguous().transpose(0, 1)


def _through_fp32(function, q, k, v, *args, return_lse, **kwargs):
    """The call on fp32 copies, its output rounded to bf16: Triton's interpreter multiplies bf16 tiles wrongly."""
    result = function(q.float(), k.float(), v.float(), *args, return_lse=return_lse, **kwargs)
    return (result[0].to(torch.bfloat16), result[1]) if return_lse else result.to(torch.bfloat16)


def _scale(scale, head_dim):
    return float(head_dim**-0.5 if scale is None else scale)


def _seed_tensor(dropout_p, seed, like):
    """The seed operand of the operators: None without dropout; else the given seed, or a fresh one drawn from
    torch's generator for `like`'s device, as a one-element int64 tensor on that device."""
    if dropout_p == 0:
        return None
    if seed is None:
        return attention_dropout_seed(like)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    return torch.tensor([seed], dtype=torch.int64, device=like.device)


def _natural_log(lse):
    """The kernels' log2-domain LSE (+inf for a row that sees no key) as a natural log (-inf for such a row)."""
    return torch.where(torch.isinf(lse), float("-inf"), lse * _LN_2)


def _dropout_masks(seed, batch, heads, sequences, dropout_p, device):
    """The keep-masks of (first batch index, Nq, Nk) sequences, each (batch, heads, Nq, Nk); all kept without
    dropout (no seed)."""
    masks = []
    for first_b, n_q, n_k in sequences:
        mask = torch.ones((batch, heads, n_q, n_k), device=device, dtype=torch.bool)
        if seed is not None and mask.numel():
            block = 64 if mask.is_cuda else 32
            grid = (triton.cdiv(n_q, block), triton.cdiv(n_k, block), batch * heads)
            with launch_device(mask):
                dropout_mask_kernel[grid](mask, seed, first_b, heads, n_q, n_k, float(dropout_p), BLOCK_M=block,
                                          BLOCK_N=block)
        masks.append(mask)
    return masks


# --------------------------------------------------------------------------------------------------------------
# Decoding against a key/value cache


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None, scale=None):
    """Attention of a few new tokens per sequence against a preallocated key/value cache, split along the keys
    ("flash decoding"): FlashAttention's flash_attn_with_kvcache, for the decoding steps of generation.

    q: (B, H, Nq, D), the new tokens' queries (Nq is meant to be small: 1 to 16; a prompt is better served by
        `attention`). fp16, bf16 or fp32 on CUDA (compute capability 8.0 or newer), or on CPU under
        TRITON_INTERPRET=1; any strides; D up to 256.
    k_cache, v_cache: (B, H_KV, Nmax, D), q's dtype and device, H a multiple of H_KV (query head h reads key/value
        head h // (H / H_KV)); preallocated, with a contiguous last dimension (they are written in place, so
        they are never copied).
    cache_seqlens: int32 (B,) on q's device, each sequence's filled length before this call; or one int, the length
        of every sequence (checked on the host: no device synchronisation).
    k_new, v_new: (B, H_KV, Nq, D), both or neither: written into the caches in place at rows
        [cache_seqlens[b], cache_seqlens[b] + Nq) and attended to. The caller advances cache_seqlens.
    scale: the softmax scale, D ** -0.5 when None.
    Causal, aligned bottom-right within each sequence's own length L (cache_seqlens, plus Nq with k_new): query
    i sees keys j <= L - Nq + i; a query that sees no key (L < Nq) outputs 0. Keys past L are never read.
    cache_seqlens must lie in [0, Nmax - Nq] with k_new ([0, Nmax] without): checked with one device
    synchronisation, except under torch.compile and CUDA-graph capture, where the kernels read and write nothing
    out of range and a sequence whose length is out of range outputs NaN. A bad input raises before the caches
    are touched.
    Inference only: there is no backward, and inputs that require grad are refused while autograd is recording
    (call it under torch.no_grad() or torch.inference_mode()).
    Returns out, (B, H, Nq, D) in q's dtype, its heads side by side in memory.
    """
    return _decode_attention(q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new, scale=scale)


def _decode_attention(q, k_cache, v_cache, cache_seqlens, *, k_new, v_new, scale, num_splits=None):
    """decode_attention, with the number of chunks each sequence's keys are cut into: None to let the launcher
    choose (from the GPU's multiprocessors, the batch and Nmax), or 1 ... MAX_DECODE_SPLITS (the tests force both
    ends)."""
    _check_decode_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    _check_options(0.0, scale, False, q.shape[2], k_cache.shape[2])  # decoding has no dropout and no LSE
    if num_splits is not None and not (isinstance(num_splits, int) and 1 <= num_splits <= MAX_DECODE_SPLITS):
        raise ValueError(f"num_splits must be None or an int in [1, {MAX_DECODE_SPLITS}], got {num_splits!r}")
    if TRITON_INTERPRETS and q.dtype == torch.bfloat16:
        return _decode_through_fp32(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, num_splits)
    q = q if q.stride(-1) == 1 else q.contiguous()  # the kernels read q's rows whole, at 64-bit offsets
    if k_new is not None:
        k_new, v_new = (_readable(t, t.stride(2), t.shape[2], t.contiguous) for t in (k_new, v_new))
    return decode_attention_op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, _scale(scale, q.shape[-1]),
                               num_splits or 0)


def _check_decode_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new):
    """Every check of decode_attention, before anything is written: tensors, shapes, the caches' layout, the
    lengths (one synchronisation, skipped while torch.compile traces or a CUDA graph is captured), autograd."""
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together (both or neither), got only "
                         f"{'k_new' if v_new is None else 'v_new'}")
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    if k_new is not None:
        tensors.update(k_new=k_new, v_new=v_new)
    for name, t in tensors.items():
        check_tensor(name, t, ndim=4)
    check_same_device_and_dtype("q", q, **{name: t for name, t in tensors.items() if name != "q"})
    check_runnable("q", q)
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_max = k_cache.shape[1], k_cache.shape[2]
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"the caches (B, H_KV, Nmax, D) = {tuple(k_cache.shape)} must agree with q (B, H, Nq, D) "
                         f"= {tuple(q.shape)} in batch and head size")
    if min(q.shape) == 0 or min(k_cache.shape) == 0:
        raise ValueError(f"q and the caches must not be empty, got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    _check_heads("decode_attention", heads, kv_heads, head_dim)
    n_new = 0
    if k_new is not None:
        expected = (batch, kv_heads, n_q, head_dim)
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t.shape != expected:
                raise ValueError(f"{name} must be (B, H_KV, Nq, D) = {expected} (q's batch, new tokens and head "
                                 f"size, the caches' heads), got {tuple(t.shape)}")
        if n_q > n_max:
            raise ValueError(f"the caches are too short for the append: {n_max} slots per sequence, {n_q} new "
                             "tokens")
        n_new = n_q
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not rows_fit(cache, cache.stride(2), n_max):
            raise ValueError(f"{name} needs a contiguous last dimension and its rows within 2**31 elements of each "
                             f"sequence's first (strides {cache.stride()}): it is read and written in place, so "
                             "it cannot be copied into such a layout")
    _check_cache_seqlens(cache_seqlens, q, n_max, n_new)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        grads = ", ".join(name for name, t in tensors.items() if t.requires_grad)
        raise ValueError(f"decode_attention is inference only (it has no backward), but {grads} require(s) grad: "
                         "call it under torch.no_grad() or torch.inference_mode(), or pass detached tensors")


def _check_cache_seqlens(cache_seqlens, q, n_max, n_new):
    """cache_seqlens: an int, or int32 (B,) on q's device, each in [0, Nmax - n_new]. Reading a tensor's lengths
    costs one device synchronisation, so that part is skipped while torch.compile traces or a CUDA graph is being
    captured; an int is checked on the host."""
    most = n_max - n_new
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= most:
            raise ValueError(f"cache_seqlens must lie in [0, {most}] for caches of {n_max} slots, got {cache_seqlens}")
        return
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
        got = cache_seqlens.dtype if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens).__name__
        raise TypeError(f"cache_seqlens must be an int32 tensor of the batch's filled lengths, or one int for all, "
                        f"got {got}")
    if cache_seqlens.shape != (q.shape[0],):
        raise ValueError(f"cache_seqlens must have shape (B,) = ({q.shape[0]},), one length per sequence, got "
                         f"{tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    out_of_range = {b: n for b, n in enumerate(cache_seqlens.tolist()) if not 0 <= n <= most}
    if out_of_range:
        room = f", leaving room for the {n_new} new token{'s' if n_new > 1 else ''}" if n_new else ""
        shown = ", ".join(f"cache_seqlens[{b}] = {n}" for b, n in list(out_of_range.items())[:4])
        raise ValueError(f"cache_seqlens must lie in [0, {most}] for caches of {n_max} slots{room}; got {shown}"
                         + (" ..." if len(out_of_range) > 4 else ""))


def _decode_through_fp32(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, num_splits):
    """decode_attention on fp32 copies, the output rounded to bf16 and the appended rows copied back into the bf16
    caches (exactly: they were bf16): Triton's interpreter multiplies bf16 tiles wrongly."""
    k_cache32, v_cache32 = k_cache.float(), v_cache.float()
    k_new32, v_new32 = (None, None) if k_new is None else (k_new.float(), v_new.float())
    out = _decode_attention(q.float(), k_cache32, v_cache32, cache_seqlens, k_new=k_new32, v_new=v_new32,
                            scale=scale, num_splits=num_splits)
    if k_new is not None:
        k_cache.copy_(k_cache32)
        v_cache.copy_(v_cache32)
    return out.to(torch.bfloat16)
