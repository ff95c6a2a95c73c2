"""Decoding as a PyTorch operator: the launcher of the decoding kernels (kernels.py), an _library.Operator
(registered with torch.library, so torch.compile sees one opaque node that mutates the caches; called directly in
eager mode). Inference only: no autograd formula.

Operator (namespace decoder_kernels): decode_attention. Inputs arrive validated (api.py): q (B, H, Nq, D) with a
contiguous last dimension, the caches (B, H_KV, Nmax, D) and k_new, v_new (B, H_KV, Nq, D) readable in place,
cache_seqlens int32 (B,).
"""

from typing import Optional

import torch
from torch import Tensor

from .._gpu import launch_device
from .._library import bf16_in_fp32, cdiv, operator
from ..attention.shared import operands_aligned
from ..attention.tiles import block_d
from . import tiles
from .kernels import decode_append_kernel, decode_combine_kernel, decode_split_kernel


def _strides(name, t):
    """t's (batch, head, row) strides as the kernel arguments stride_<name>b, stride_<name>h and stride_<name>m
    (stride_<name>n for rows of keys, every tensor but q and the output o)."""
    row = "m" if name in ("q", "o") else "n"
    return {f"stride_{name}b": t.stride(0), f"stride_{name}h": t.stride(1), f"stride_{name}{row}": t.stride(2)}


def _allocate_output(q):
    """The decoding output, (B, H, Nq, D) in q's dtype with its heads side by side in memory ((B, Nq, H, D)), so
    merging the heads, out.transpose(1, 2).reshape(B, Nq, H * D), is free (the kernels' offsets into it are
    64-bit)."""
    batch, heads, n_q, head_dim = q.shape
    return torch.empty((batch, n_q, heads, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)


def _programs_per_split(q, kv_heads):
    """The split kernel's programs per chunk of keys: (B x H_KV) groups times each group's blocks of query rows."""
    batch, heads, n_q, head_dim = q.shape
    row_blocks = cdiv(heads // kv_heads * n_q, tiles.decode_tile(head_dim, q.dtype).block_m)
    return row_blocks * batch * kv_heads


def _split_count(q, k_cache, num_splits):
    """num_splits, or where it is 0 the launcher's choice (tiles.launch_splits)."""
    return num_splits or tiles.launch_splits(_programs_per_split(q, k_cache.shape[1]), k_cache.shape[2], q.device)


def _append(k_new, v_new, k_cache, v_cache, cache_seqlens):
    """Write k_new and v_new into the caches at rows [cache_seqlens[b], cache_seqlens[b] + Nq) of each sequence
    (a copy: exact in every dtype, the interpreter's bf16 included). Launches on the current device, as _attend
    does: the operator makes q's current."""
    batch, kv_heads, n_q, head_dim = k_new.shape
    decode_append_kernel[(batch * kv_heads,)](
        K_NEW=k_new, V_NEW=v_new, K_CACHE=k_cache, V_CACHE=v_cache, CACHE_SEQLENS=cache_seqlens,
        **_strides("kn", k_new), **_strides("vn", v_new), **_strides("kc", k_cache), **_strides("vc", v_cache),
        H_KV=kv_heads, N_Q=n_q, N_K=k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim),
        BLOCK_R=tiles.APPEND_BLOCK_R, ALIGNED=operands_aligned(k_new, v_new, k_cache, v_cache),
    )


def _attend(q, k_cache, v_cache, cache_seqlens, n_new, scale, num_splits):
    """Attention of q against each sequence's first cache_seqlens[b] + n_new cached keys, cut into num_splits
    chunks: the split kernel, and the combine kernel when num_splits > 1. Returns out (_allocate_output)."""
    batch, heads, n_q, head_dim = q.shape
    kv_heads, n_max = k_cache.shape[1], k_cache.shape[2]
    tile = tiles.decode_tile(head_dim, q.dtype)
    programs_per_split = _programs_per_split(q, kv_heads)
    out = _allocate_output(q)
    split = num_splits > 1
    # The chunks' partial results (unused with one split: the split kernel then writes out itself).
    o_splits = torch.empty((batch, heads, n_q, num_splits, head_dim), device=q.device,
                           dtype=torch.float32) if split else out
    lse_splits = torch.empty((batch, heads, n_q, num_splits), device=q.device, dtype=torch.float32) if split else out
    common = dict(H=heads, H_KV=kv_heads, N_Q=n_q, num_splits=num_splits, HEAD_DIM=head_dim,
                  BLOCK_D=block_d(head_dim), BLOCK_R=tile.block_m)
    decode_split_kernel[(num_splits * programs_per_split,)](
        Q=q, K=k_cache, V=v_cache, O=out, O_SPLITS=o_splits, LSE_SPLITS=lse_splits, CACHE_SEQLENS=cache_seqlens,
        **_strides("q", q), **_strides("k", k_cache), **_strides("v", v_cache), **_strides("o", out),
        N_K=n_max, n_new=n_new, scale=scale, BLOCK_N=tile.block_n, SPLIT=split,
        ALIGNED=operands_aligned(q, k_cache, v_cache, out), num_warps=tile.num_warps, num_stages=tile.num_stages,
        **common,
    )
    if split:
        decode_combine_kernel[(programs_per_split,)](
            O_SPLITS=o_splits, LSE_SPLITS=lse_splits, O=out, **_strides("o", out), ALIGNED=operands_aligned(out),
            num_warps=tiles.COMBINE_NUM_WARPS, **common,
        )
    return out


def _decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, num_splits, attend):
    """The append (when k_new is given), then `attend`, on q's device."""
    with launch_device(q):
        if k_new is not None:
            _append(k_new, v_new, k_cache, v_cache, cache_seqlens)
        n_new = 0 if k_new is None else q.shape[2]
        return attend(q, k_cache, v_cache, cache_seqlens, n_new, scale, _split_count(q, k_cache, num_splits))


def _attend_in_fp32_on_cpu(q, k_cache, v_cache, cache_seqlens, n_new, scale, num_splits):
    """_attend under Triton's interpreter: a bf16 call on fp32 copies of q and of the caches' slots some sequence
    fills (bf16_in_fp32), not of the whole caches. A sequence whose length is out of range still outputs NaN: it
    overflows the slots copied as it overflows the caches."""
    if q.dtype == torch.bfloat16:
        filled = max(1, min(k_cache.shape[2], int(cache_seqlens.max()) + n_new))
        k_cache, v_cache = k_cache[:, :, :filled], v_cache[:, :, :filled]
    return bf16_in_fp32(_attend)(q, k_cache, v_cache, cache_seqlens, n_new, scale, num_splits)


def _decode_op(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k_new: Optional[Tensor],
    v_new: Optional[Tensor], scale: float, num_splits: int,
) -> Tensor:
    """Write k_new and v_new (both or neither) into the caches at each sequence's filled length, then attend.
    num_splits: chunks per sequence, 0 to let tiles.launch_splits choose. Returns out, (B, H, Nq, D) in q's dtype.
    The caches are declared mutated (torch.compile and functionalization then keep the writes), whether or not
    this call appends."""
    return _decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, num_splits, _attend)


def _decode_on_cpu(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, num_splits):
    return _decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, num_splits, _attend_in_fp32_on_cpu)


def _written_in_place(decode):
    """`decode` for the eager route, which bypasses the dispatcher: it bumps the caches' version counters as the
    operator's in-place writes do, so autograd still sees that they changed."""

    def run(q, k_cache, v_cache, *args, **kwargs):
        out = decode(q, k_cache, v_cache, *args, **kwargs)
        torch.autograd.graph.increment_version((k_cache, v_cache))
        return out

    return run


decode_attention = operator("decode_attention", _decode_op, fake=lambda q, *_: _allocate_output(q),
                            cpu=_decode_on_cpu, eager=_written_in_place(_decode_op),
                            eager_cpu=_written_in_place(_decode_on_cpu), mutates_args=("k_cache", "v_cache"))
