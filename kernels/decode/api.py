"""The public decoding function, decode_attention: its checks, the layout the kernels read and the softmax scale,
then the operator. The options after the tensors are keyword-only, with FlashAttention's meanings."""

import torch

from .._validate import check_runnable, check_same_device_and_dtype, check_tensor, may_synchronise
from ..attention.api import softmax_scale
from ..attention.checks import check_heads, check_scale
from ..attention.ops import readable, rows_fit
from .ops import decode_attention as decode_attention_op


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
    _check_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale)
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()  # the kernels read q's rows whole, at 64-bit offsets
    if k_new is not None:
        k_new, v_new = (readable(t, t.stride(2), t.shape[2], t.contiguous) for t in (k_new, v_new))
    scale = softmax_scale(scale, q.shape[-1])
    # num_splits=0: the launcher chooses how many chunks each sequence's keys are cut into
    return decode_attention_op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, num_splits=0)


def _check_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale):
    """Every check of decode_attention, before anything is written: tensors, shapes, the caches' layout, the
    lengths (one synchronisation, skipped where that may not happen), the scale, autograd."""
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
    check_heads("decode_attention", heads, kv_heads, head_dim, keys="k_cache")
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
    check_scale(scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        grads = ", ".join(name for name, t in tensors.items() if t.requires_grad)
        raise ValueError(f"decode_attention is inference only (it has no backward), but {grads} require(s) grad: "
                         "call it under torch.no_grad() or torch.inference_mode(), or pass detached tensors")


def _check_cache_seqlens(cache_seqlens, q, n_max, n_new):
    """cache_seqlens: an int, or int32 (B,) on q's device, each in [0, Nmax - n_new]. Reading a tensor's lengths
    costs one device synchronisation, so that part is skipped where that may not happen (may_synchronise); an int
    is checked on the host."""
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
    if not may_synchronise(q):
        return
    out_of_range = {b: n for b, n in enumerate(cache_seqlens.tolist()) if not 0 <= n <= most}
    if out_of_range:
        room = f", leaving room for the {n_new} new token{'s' if n_new > 1 else ''}" if n_new else ""
        shown = ", ".join(f"cache_seqlens[{b}] = {n}" for b, n in list(out_of_range.items())[:4])
        raise ValueError(f"cache_seqlens must lie in [0, {most}] for caches of {n_max} slots{room}; got {shown}"
                         + (" ..." if len(out_of_range) > 4 else ""))
