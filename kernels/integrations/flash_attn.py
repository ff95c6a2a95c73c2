"""FlashAttention 2's entry points on the kernels. Code written for flash-attn runs on them by changing its import:

    from kernels.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

The functions take flash-attn's arguments, with its names, order and defaults (flash_attn/flash_attn_interface.py,
version 2), and its layout: (batch, seqlen, nheads, headdim); packed (total, nheads, headdim) with int32
cu_seqlens for varlen; caches (batch, seqlen_cache, nheads_k, headdim). They need no flash-attn installed.

Nothing is copied: the kernels read any strides, so each call hands them (batch, nheads, seqlen, headdim)
transposed views of the tensors it gets and returns a transposed view of their output, which is laid out
(batch, seqlen, nheads, headdim) in memory; the caches are read and appended in place through their views.
The meanings are flash-attn's: the causal mask aligned bottom-right, window_size=(left, right) with -1 unbounded,
dropout applied whenever dropout_p > 0 (its seed drawn from torch's generator), and gradients through
flash_attn_func and flash_attn_varlen_func (always deterministic, so `deterministic` may be either).

What the kernels cannot compute is refused with an error naming the option, never ignored: ALiBi, softcapping,
paged caches (block_table), rotary embeddings, cache_batch_idx and cache_leftpad, a num_splits other than 0, the
attention probabilities (return_attn_probs with dropout), the log-sum-exp of the decoding kernel, and decoding
windows the causal decoding kernel does not compute (a bounded left side, or several queries without causal).
"""

import math
import numbers

import torch

from .. import attention, attention_varlen, decode_attention

_DENSE = ("batch", "seqlen", "nheads", "headdim")
_PACKED = ("total", "nheads", "headdim")

# flash-attn's options the kernels do not compute, and what to do instead: each is refused when it is not None.
_UNSUPPORTED = {
    "alibi_slopes": "the kernels add no ALiBi bias to the scores",
    "block_table": "the kernels read contiguous caches, not paged ones",
    "rotary_cos": "apply the rotary embedding to q and k before the call",
    "rotary_sin": "apply the rotary embedding to q and k before the call",
    "cache_batch_idx": "sequence b reads and appends to row b of the caches",
    "cache_leftpad": "each sequence's keys start at slot 0 of its cache row",
}


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's flash_attn_func on `kernels.attention`.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), nheads a multiple of
        nheads_k (query head h reads key/value head h // (nheads / nheads_k)). Any strides.
    dropout_p: the probability of dropping an attention weight (pass 0.0 in evaluation).
    softmax_scale: headdim ** -0.5 when None.
    causal: query i sees keys j <= i + seqlen_k - seqlen_q.
    window_size: (left, right): query i sees keys i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q +
        right, -1 for an unbounded side.
    softcap: 0.0 only; alibi_slopes: None only. deterministic: either (the backward always is).
    return_attn_probs: also return softmax_lse, (batch, nheads, seqlen_q) fp32, and S_dmask, an empty tensor as
        flash-attn returns it without dropout; refused with dropout (the kernels never form the probabilities).
    Returns out, (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, S_dmask).
    """
    _check_layout(_DENSE, q=q, k=k, v=v)
    options = _attention_options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                 return_attn_probs)
    result = attention(*(_transposed(t) for t in (q, k, v)), **options)
    if return_attn_probs:
        out, softmax_lse = result
        return _transposed(out), softmax_lse, _no_probabilities(q)
    return _transposed(result)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn's flash_attn_varlen_func on `kernels.attention_varlen`: sequences of different lengths packed
    one after another, each attending within itself.

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim). Any strides.
    cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,), the cumulative lengths; max_seqlen_q, max_seqlen_k: the
        longest sequence of each.
    The options mean what they mean in `flash_attn_func`, per sequence; softmax_lse is (nheads, total_q).
    block_table: None only.
    Returns out, (total_q, nheads, headdim), or (out, softmax_lse, S_dmask).
    """
    _check_layout(_PACKED, q=q, k=k, v=v)
    _refuse_unsupported(block_table=block_table)
    options = _attention_options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                 return_attn_probs)
    result = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options)
    if return_attn_probs:
        out, softmax_lse = result
        return out, softmax_lse, _no_probabilities(q)
    return result


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn's flash_attn_with_kvcache on `kernels.decode_attention`: the decoding steps of generation.

    q: (batch, seqlen_q, nheads, headdim), the new tokens' queries; any strides.
    k_cache, v_cache: (batch, seqlen_cache, nheads_k, headdim), with a contiguous last dimension: read, and
        appended to, in place.
    k, v: (batch, seqlen_q, nheads_k, headdim), both or neither: written into the caches at rows
        [cache_seqlens[b], cache_seqlens[b] + seqlen_q) and attended to. The caller advances cache_seqlens.
    cache_seqlens: int32 (batch,) or one int, each sequence's filled length before the call; None: the caches are
        full (seqlen_cache), and then k and v cannot be appended.
    causal: query i sees the keys up to its own position, L - seqlen_q + i with L the length after the append;
        without it (flash-attn's default) every query sees all L keys, which the kernel computes for one query
        (the same keys) and refuses for several. window_size: a left side of -1 (or one covering the whole
        cache) only.
    softmax_scale: headdim ** -0.5 when None. rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad,
    block_table, alibi_slopes: None only; softcap: 0.0 only; num_splits: 0 only (the kernel picks its split
    count); return_softmax_lse: False only. rotary_interleaved: either (it only applies with rotary_cos).
    Inference only: inputs that require grad are refused while autograd is recording.
    Returns out, (batch, seqlen_q, nheads, headdim).
    """
    _check_layout(_DENSE, q=q, k_cache=k_cache, v_cache=v_cache)
    if (k is None) != (v is None):
        raise ValueError(f"k and v must be given together (both or neither), got only {'k' if v is None else 'v'}")
    if k is not None:
        _check_layout(_DENSE, k=k, v=v)
    _refuse_unsupported(rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_batch_idx=cache_batch_idx,
                        cache_leftpad=cache_leftpad, block_table=block_table, alibi_slopes=alibi_slopes)
    for name, flag in (("causal", causal), ("rotary_interleaved", rotary_interleaved),
                       ("return_softmax_lse", return_softmax_lse)):
        _check_bool(name, flag)
    _check_softmax_scale(softmax_scale)
    _check_softcap(softcap)
    _check_window_size(window_size)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__}")
    if num_splits != 0:
        raise ValueError(f"num_splits={num_splits} is not supported: the decoding kernel picks its own split count "
                         "(from the GPU, the batch and the cache length); pass num_splits=0")
    if return_softmax_lse:
        raise ValueError("return_softmax_lse=True is not supported: the decoding kernel does not return the "
                         "log-sum-exp")
    _check_decoding_band(causal, window_size, q.shape[1], k_cache.shape[1])
    if k is not None:
        _check_new_keys(q, k_cache, k, v)
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens must be given with k and v: it says where in the caches they go")
        cache_seqlens = k_cache.shape[1]
    out = decode_attention(_transposed(q), _transposed(k_cache), _transposed(v_cache), cache_seqlens,
                           k_new=None if k is None else _transposed(k), v_new=None if v is None else _transposed(v),
                           scale=softmax_scale)
    return _transposed(out)


# --------------------------------------------------------------------------------------------------------------
# flash-attn's layout and options, in the kernels' terms


def _transposed(t):
    """(batch, seqlen, heads, headdim) as the kernels' (batch, heads, seqlen, headdim), or back: a view."""
    return t.transpose(1, 2)


def _attention_options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                       return_attn_probs):
    """The keyword options of `kernels.attention` and `kernels.attention_varlen` for flash-attn's."""
    _refuse_unsupported(alibi_slopes=alibi_slopes)
    for name, flag in (("causal", causal), ("deterministic", deterministic), ("return_attn_probs", return_attn_probs)):
        _check_bool(name, flag)
    _check_softmax_scale(softmax_scale)
    _check_softcap(softcap)
    _check_window_size(window_size)
    if return_attn_probs and isinstance(dropout_p, numbers.Real) and dropout_p > 0:
        raise ValueError("return_attn_probs=True is not supported with dropout_p > 0: the kernels never form the "
                         "attention probabilities (kernels.attention_dropout_mask gives the dropout mask)")
    return dict(dropout_p=dropout_p, scale=softmax_scale, causal=causal, window=tuple(window_size),
                return_lse=return_attn_probs)


def _no_probabilities(q):
    """S_dmask as flash-attn returns it when it forms no probabilities (without dropout): an empty tensor."""
    return torch.empty((0,), dtype=q.dtype, device=q.device)


def _check_layout(dims, **tensors):
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != len(dims):
            raise ValueError(f"{name} must be ({', '.join(dims)}), flash-attn's layout, got shape {tuple(t.shape)}")


def _check_new_keys(q, k_cache, k, v):
    expected = (q.shape[0], q.shape[1], k_cache.shape[2], q.shape[3])
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must be (batch, seqlen_q, nheads_k, headdim) = {expected}: q's batch, new "
                             f"tokens and head size, the caches' heads; got {tuple(t.shape)}")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_softmax_scale(softmax_scale):
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a real number or None, got {type(softmax_scale).__name__}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a finite positive number, got {softmax_scale}")


def _check_softcap(softcap):
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number, got {type(softcap).__name__}")
    if softcap != 0:
        raise ValueError(f"softcap={softcap} is not supported: the kernels do not cap the scores; pass softcap=0.0")


def _check_window_size(window_size):
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be (left, right), two ints, got {window_size!r}")
    if min(window_size) < -1:
        raise ValueError(f"window_size sides must be -1 (unbounded) or >= 0, got {tuple(window_size)}")


def _check_decoding_band(causal, window_size, seqlen_q, seqlen_cache):
    """The decoding kernel computes one band: causal, with no left bound. flash-attn's options give that band
    when the left side is unbounded (-1, or wide enough to reach slot 0 from any position in the cache) and the
    right side stops at each query's own position: with causal, with a right side of 0, or with one query (the
    keys after it are not there)."""
    left, right = window_size
    if left != -1 and left < seqlen_cache - 1:
        raise ValueError(f"window_size={tuple(window_size)} is not supported: the decoding kernel has no sliding "
                         f"window (a left side of -1, or at least the cache's {seqlen_cache} slots - 1, is)")
    if not (causal or right == 0 or seqlen_q == 1):
        raise ValueError(f"causal=False with {seqlen_q} queries is not supported: the decoding kernel is causal "
                         "(each query sees the keys up to its own position); pass causal=True")


def _refuse_unsupported(**options):
    for name, value in options.items():
        if value is not None:
            raise ValueError(f"{name} is not supported: {_UNSUPPORTED[name]}; pass {name}=None")
