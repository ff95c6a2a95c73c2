"""Attention as PyTorch operators: the launchers of the Triton kernels, each an _library.Operator (registered with
torch.library, so torch.compile sees each launch as one opaque node with known output shapes; called directly in
eager mode), and the autograd formula that ties the forward operator to the backward one; and the launcher of the
dropout-mask kernel.

Operators (namespace decoder_kernels): attention_forward, attention_backward, attention_dropout_seed. The forward
and backward take a dense batch, q (B, H, Nq, D) and k, v (B, H_KV, Nk, D), or packed sequences (cu_seqlens_q and
cu_seqlens_k given): q (total_q, H, D), k, v (total_k, H_KV, D). The band is (window_left, window_right), -1 for
an unbounded side; causal attention is window_right = 0. Inputs arrive validated, with a contiguous last
dimension and in-sequence offsets below 2^31 (api.py). On CPU (Triton's interpreter) a bf16 call is computed in
fp32 (_library.bf16_in_fp32).
"""

from typing import Optional

import torch
from torch import Tensor

from .._gpu import launch_device
from .._library import bf16_in_fp32, cdiv, differentiable, operator
from . import tiles
from .backward import attention_backward_kernel, attention_backward_preprocess_kernel
from .forward import attention_forward_kernel, dropout_mask_kernel
from .shared import operands_aligned

# Offsets inside one (batch, head) sequence are 32-bit in the kernels.
MAX_OFFSET = 2**31
# The kernels' tensors whose rows are keys (their row stride is stride_<name>n; the others' stride_<name>m).
_KEY_ROWS = ("k", "v", "dk", "dv")
# The (batch, head, row) stride arguments of each tensor the kernels take, by its name there.
_STRIDE_ARGUMENTS = {name: (f"stride_{name}b", f"stride_{name}h", f"stride_{name}{'n' if name in _KEY_ROWS else 'm'}")
                     for name in ("q", "k", "v", "o", "do", "dq", "dk", "dv")}


def _strides(t):
    """t's strides as the kernels take them, read once: 0 where a dimension has one element, so that a stride that
    never moves a pointer cannot exceed the kernels' integer types."""
    return [stride if size > 1 else 0 for size, stride in zip(t.shape, t.stride())]


def rows_fit(t, row_stride, n_rows):
    """Whether the kernels can read t as it is: a contiguous last dimension, and every row of a sequence within
    32-bit offsets of its first."""
    return t.stride(-1) == 1 and (n_rows - 1) * row_stride + t.shape[-1] <= MAX_OFFSET - 1


def readable(t, row_stride, n_rows, copy):
    """t as the kernels read it: unchanged when its rows fit (rows_fit), else `copy()`: a layout with each head's
    rows together. Too long a sequence even then is a ValueError."""
    if rows_fit(t, row_stride, n_rows):
        return t
    t = copy()
    row_stride = t.stride(-2) if t.dim() == 4 else t.stride(0)
    if not rows_fit(t, row_stride, n_rows):
        raise ValueError(f"a sequence of {n_rows} rows of {t.shape[-1]} elements spans 2**31 elements or more, "
                         "beyond the kernels' 32-bit offsets")
    return t


class _Launch:
    """What every launch of one call shares: the sizes, the layout (dense or packed) and the band."""

    def __init__(self, q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right):
        self.packed = cu_seqlens_q is not None
        if self.packed:
            self.batch, self.n_q, self.n_k = cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k
            self.heads, self.kv_heads = q.shape[1], k.shape[1]
        else:
            (self.batch, self.heads, self.n_q, _), self.n_k, self.kv_heads = q.shape, k.shape[2], k.shape[1]
        self.head_dim = q.shape[-1]
        self.block_d = tiles.block_d(self.head_dim)
        # Unused pointers (no dropout, no packing) get a tensor the kernel never reads.
        self.cu_seqlens = (cu_seqlens_q, cu_seqlens_k) if self.packed else (q, q)
        # The arguments every attention kernel but delta's takes alike, by name.
        self.arguments = dict(CU_SEQLENS_Q=self.cu_seqlens[0], CU_SEQLENS_K=self.cu_seqlens[1], H=self.heads,
                              H_KV=self.kv_heads, N_Q=self.n_q, N_K=self.n_k, window_left=window_left,
                              window_right=window_right)
        self.constexprs = dict(HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, BOUNDED_LEFT=window_left >= 0,
                               BOUNDED_RIGHT=window_right >= 0, VARLEN=self.packed)

    def row_stride(self, t):
        """The row stride of q, k, v or a tensor laid out like one."""
        return _strides(t)[0 if self.packed else 2]

    def strides(self, name, t):
        """The (batch, head, row) strides of q, k, v or a tensor laid out like one, as the kernel arguments
        stride_<name>b, stride_<name>h and stride_<name>m (stride_<name>n for rows of keys): dense (B, H, N, D) or
        packed (total, H, D), whose batch stride is 0 (a packed sequence is found by its first row)."""
        strides = _strides(t)
        batch, head, row = _STRIDE_ARGUMENTS[name]
        if self.packed:
            return {batch: 0, head: strides[1], row: strides[0]}
        return {batch: strides[0], head: strides[1], row: strides[2]}

    def statistics_strides(self, lse):
        """The (batch, head) strides of LSE or DELTA, stride_lb and stride_lh: dense (B, H, Nq), packed
        (H, total_q)."""
        strides = _strides(lse)
        if self.packed:
            return {"stride_lb": 0, "stride_lh": strides[0]}
        return {"stride_lb": strides[0], "stride_lh": strides[1]}

    def grid(self, n, heads, block):
        return (cdiv(n, block) * self.batch * heads,)

    def even(self, *blocks):
        """The kernels' EVEN: a dense call whose lengths are multiples of every block, so no block is partial."""
        return not self.packed and all(self.n_q % block == 0 and self.n_k % block == 0 for block in blocks)


def _allocate_forward_outputs(q, packed, n_q):
    """out and lse of the forward, allocated the same way by the launch and by its fake implementation. The
    output's heads sit side by side in memory ((B, Nq, H, D), or packed (total_q, H, D)), so the usual
    transpose(1, 2).reshape(B, Nq, H * D) that merges heads is free, unless a sequence's rows would then lie more
    than 2^31 elements apart: then each head is contiguous."""
    heads, head_dim = q.shape[-2 if packed else 1], q.shape[-1]
    heads_side_by_side = n_q * heads * head_dim < MAX_OFFSET
    if packed:
        total = q.shape[0]
        out = torch.empty((total, heads, head_dim) if heads_side_by_side else (heads, total, head_dim),
                          device=q.device, dtype=q.dtype)
        out = out if heads_side_by_side else out.transpose(0, 1)
        lse = torch.empty((heads, total), device=q.device, dtype=torch.float32)
    else:
        batch = q.shape[0]
        if heads_side_by_side:
            out = torch.empty((batch, n_q, heads, head_dim), device=q.device, dtype=q.dtype).transpose(1, 2)
        else:
            out = torch.empty((batch, heads, n_q, head_dim), device=q.device, dtype=q.dtype)
        lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    return out, lse


def _forward(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, window_left: int, window_right: int, dropout_p: float, scale: float,
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel. Returns (out, lse); see the kernel for their meaning. `seed` (a one-element int64
    tensor on the inputs' device, None without dropout) is an argument, so the call is a pure function of its
    arguments and torch.compile can treat it as an opaque operator."""
    launch = _Launch(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right)
    out, lse = _allocate_forward_outputs(q, launch.packed, launch.n_q)
    aligned = operands_aligned(q, k, v, out)
    tile = tiles.launch_tile("forward", launch.head_dim, q.dtype, dropout_p > 0, q.device, aligned)
    with launch_device(q):
        attention_forward_kernel[launch.grid(launch.n_q, launch.heads, tile.block_m)](
            Q=q, K=k, V=v, O=out, LSE=lse, SEED=seed if seed is not None else lse,
            **launch.strides("q", q), **launch.strides("k", k), **launch.strides("v", v),
            **launch.strides("o", out), **launch.statistics_strides(lse), **launch.arguments,
            scale=scale, dropout_p=dropout_p, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, DROPOUT=dropout_p > 0,
            ALIGNED=aligned, EVEN=launch.even(tile.block_m, tile.block_n), num_warps=tile.num_warps,
            num_stages=tile.num_stages, **launch.constexprs,
        )
    return out, lse


def _forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right,
                  dropout_p, scale, seed):
    packed = cu_seqlens_q is not None
    return _allocate_forward_outputs(q, packed, max_seqlen_q if packed else q.shape[2])


attention_forward = operator("attention_forward", _forward, fake=_forward_fake,
                             cpu=bf16_in_fp32(_forward, fp32_outputs=(1,)))  # lse stays fp32


def _backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, window_left: int, window_right: int,
    dropout_p: float, scale: float, seed: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the delta kernel, then the one launch of dK, dV and dQ. Returns (dq, dk, dv) in the input dtype, laid
    out like q, k, v."""
    launch = _Launch(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right)
    if not rows_fit(grad_out, launch.row_stride(grad_out), launch.n_q):
        grad_out = torch.empty_like(out).copy_(grad_out)  # e.g. the stride-0 gradient of out.sum(); out's layout
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    operands = (q, k, v, out, grad_out, dq, dk, dv)
    aligned = operands_aligned(*operands)
    if aligned or not tiles.copies_misaligned_operands("backward", launch.head_dim, tiles.precision(q.dtype)):
        _launch_backward(launch, *operands, lse, dropout_p, scale, seed, aligned)
    else:  # on copies whose rows start 16 bytes apart, the gradients copied back
        inputs = [_rows_16_bytes_apart(x).copy_(x) for x in (q, k, v, out, grad_out)]
        grads = [_rows_16_bytes_apart(x) for x in (dq, dk, dv)]
        _launch_backward(launch, *inputs, *grads, lse, dropout_p, scale, seed, aligned=True)
        for grad, computed in zip((dq, dk, dv), grads):
            grad.copy_(computed)
    return dq, dk, dv


def _rows_16_bytes_apart(x):
    """An empty tensor shaped like x in a fresh buffer whose rows (along the last dim) start 16 bytes apart: every
    operand of a launch made of these is aligned (shared.operands_aligned)."""
    columns, per_16_bytes = x.shape[-1], 16 // x.element_size()
    return x.new_empty(*x.shape[:-1], cdiv(columns, per_16_bytes) * per_16_bytes)[..., :columns]


def _launch_backward(launch, q, k, v, out, grad_out, dq, dk, dv, lse, dropout_p, scale, seed, aligned):
    """The delta kernel, then the one launch of dK, dV and dQ into dq, dk, dv; `aligned`: every operand is."""
    dropout = dropout_p > 0
    delta = torch.empty_like(lse)
    tile = tiles.launch_tile("backward", launch.head_dim, q.dtype, dropout, q.device, aligned)
    head_slices = tiles.head_slices(tile, launch.head_dim)
    key_programs = launch.grid(launch.n_k, launch.kv_heads, tile.block_n1)[0] * head_slices * \
        (2 if tile.dk_dv_apart else 1)
    query_programs = launch.grid(launch.n_q, launch.heads, tile.block_m2)[0]
    with launch_device(q):
        # 1. delta = rowsum(dO * O)
        block_m = tiles.preprocess_block_m(launch.block_d, q.dtype)
        grad_out_strides, statistics_strides = launch.strides("do", grad_out), launch.statistics_strides(lse)
        attention_backward_preprocess_kernel[launch.grid(launch.n_q, launch.heads, block_m)](
            O=out, DO=grad_out, DELTA=delta, CU_SEQLENS_Q=launch.cu_seqlens[0], **launch.strides("o", out),
            **grad_out_strides, **statistics_strides, H=launch.heads, N_Q=launch.n_q,
            HEAD_DIM=launch.head_dim, BLOCK_D=launch.block_d, BLOCK_M=block_m, VARLEN=launch.packed,
            ALIGNED=aligned,
        )
        # 2. dK and dV per key block, dQ per query block, in one launch
        attention_backward_kernel[(key_programs + query_programs,)](
            Q=q, K=k, V=v, DO=grad_out, DQ=dq, DK=dk, DV=dv, LSE=lse, DELTA=delta,
            SEED=seed if seed is not None else lse, **launch.strides("q", q), **launch.strides("k", k),
            **launch.strides("v", v), **grad_out_strides, **launch.strides("dq", dq),
            **launch.strides("dk", dk), **launch.strides("dv", dv), **statistics_strides,
            **launch.arguments, B=launch.batch, scale=scale, dropout_p=dropout_p, BLOCK_M1=tile.block_m1,
            BLOCK_N1=tile.block_n1, BLOCK_M2=tile.block_m2, BLOCK_N2=tile.block_n2, DROPOUT=dropout,
            ALIGNED=aligned, EVEN=launch.even(tile.block_m1, tile.block_n1, tile.block_m2, tile.block_n2),
            DK_DV_APART=tile.dk_dv_apart, HEAD_SLICES=head_slices, num_warps=tile.num_warps,
            num_stages=tile.num_stages, maxnreg=tiles.backward_max_registers(launch.head_dim, q.dtype, aligned),
            **launch.constexprs,
        )


def _backward_fake(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left,
                   window_right, dropout_p, scale, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


attention_backward = operator("attention_backward", _backward, fake=_backward_fake, cpu=bf16_in_fp32(_backward))


# Autograd: one formula for both routes (_library.differentiable), the one place the backward is defined. The seed
# is an argument of the forward, so the dropout mask is a function of the arguments and the backward regenerates
# it. The LSE output is not differentiable, and a missing gradient of out (only the LSE was used) is not
# materialised as zeros: nothing depends on out, so nothing is launched.


def _save_for_backward(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *scalars, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed)
    ctx.scalars = scalars  # max_seqlen_q, max_seqlen_k, window_left, window_right, dropout_p, scale
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _gradients(ctx, grad_out, grad_lse):
    if grad_out is None:
        return (None,) * 12
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seed = ctx.saved_tensors
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.scalars, seed)
    return (dq, dk, dv) + (None,) * 9


attention_forward = differentiable(attention_forward, _save_for_backward, _gradients)


def _draw_seed(like: Tensor) -> Tensor:
    """A dropout seed in [0, 2^31): a one-element int64 tensor on `like`'s device, drawn from that device's
    default generator, so `torch.manual_seed` reproduces it. On a GPU it is drawn by the device, not the host:
    no synchronisation, and under CUDA-graph capture every replay draws a fresh seed (torch's generator advances
    inside the graph). An operator of its own, tagged as random, so torch.compile neither replaces it by its own
    random numbers nor recomputes it in the backward: compiled and eager calls draw the same seed."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=like.device)


attention_dropout_seed = operator("attention_dropout_seed", _draw_seed,
                                  fake=lambda like: torch.empty(1, dtype=torch.int64, device=like.device),
                                  tags=(torch.Tag.nondeterministic_seeded,))


def dropout_mask(seed, batch, heads, first_b, n_q, n_k, dropout_p, device):
    """The boolean keep-mask (batch, heads, n_q, n_k) the attention kernels apply to batches first_b, first_b + 1,
    ... of a call with this seed (a one-element int64 tensor; None without dropout: everything kept). A launcher,
    not an operator: the mask helpers serve tests and inspection."""
    mask = torch.ones((batch, heads, n_q, n_k), device=device, dtype=torch.bool)
    if seed is None or mask.numel() == 0:
        return mask
    tile = tiles.dropout_mask_tile(device)
    with launch_device(mask):
        dropout_mask_kernel[(cdiv(n_q, tile.block_m), cdiv(n_k, tile.block_n), batch * heads)](
            MASK=mask, SEED=seed, first_b=first_b, H=heads, N_Q=n_q, N_K=n_k, dropout_p=float(dropout_p),
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps,
        )
    return mask
