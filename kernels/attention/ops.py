"""Attention as PyTorch operators: the launchers of the Triton kernels registered with torch.library (so
torch.compile sees each launch as one opaque node with known output shapes), and the autograd formula that ties
the forward operator to the backward one.

Operators (namespace decoder_kernels): attention_forward, attention_backward, attention_dropout_seed.
"""

from typing import Optional

import torch
import triton
from torch import Tensor

from .._library import NAMESPACE
from . import tiles
from .backward import (
    attention_backward_dkdv_kernel,
    attention_backward_dq_kernel,
    attention_backward_preprocess_kernel,
)
from .forward import attention_forward_kernel
from .shared import operands_aligned


def _strides(t):
    return tuple(t.stride())


def seed_value(seed):
    """The kernels' i32 seed from the operators' seed tensor (None when there is no dropout)."""
    return 0 if seed is None else int(seed.item())


def _allocate_forward_outputs(q, k):
    """out and lse of the forward, allocated the same way by the launch and by its fake implementation."""
    B, H, N_Q, D = q.shape
    # The output is laid out as (B, Nq, H, D) in memory, so the usual transpose(1, 2).reshape(B, Nq, H * D) that
    # merges heads is free.
    out = torch.empty((B, N_Q, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, N_Q), device=q.device, dtype=torch.float32)
    return out, lse


@torch.library.custom_op(f"{NAMESPACE}::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float, scale: float, seed: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """Launch the forward kernel on validated inputs. Returns (out, lse); see the kernel for their meaning.
    `seed` (a one-element int64 CPU tensor, None without dropout) is an argument, so the call is a pure function
    of its arguments and torch.compile can treat it as an opaque operator."""
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    out, lse = _allocate_forward_outputs(q, k)
    aligned = operands_aligned(q, k, v, out)
    tile = tiles.launch_tile("forward", D, q.dtype, dropout_p > 0, q.device, aligned)
    attention_forward_kernel[(triton.cdiv(N_Q, tile.block_m), B * H)](
        q, k, v, out, lse,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, N_Q, N_K, scale, dropout_p, seed_value(seed),
        HEAD_DIM=D, BLOCK_D=tiles.block_d(D), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        CAUSAL=causal, DROPOUT=dropout_p > 0, ALIGNED=aligned,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out, lse


@attention_forward.register_fake
def _(q, k, v, causal, dropout_p, scale, seed):
    return _allocate_forward_outputs(q, k)


@torch.library.custom_op(f"{NAMESPACE}::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, dropout_p: float, scale: float, seed: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the three backward kernels. Returns (dq, dk, dv) in the input dtype, laid out like q, k, v."""
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    block_d = tiles.block_d(D)
    dropout = dropout_p > 0
    seed = seed_value(seed)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    aligned = operands_aligned(q, k, v, out, grad_out, dq, dk, dv)

    # 1. delta = rowsum(dO * O)
    delta = torch.empty((B, H, N_Q), device=q.device, dtype=torch.float32)
    preprocess_block_m = tiles.preprocess_block_m(block_d) if q.is_cuda else tiles.INTERPRETER_TILE.block_m
    attention_backward_preprocess_kernel[(triton.cdiv(N_Q, preprocess_block_m), B * H)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), H, N_Q,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=preprocess_block_m, ALIGNED=aligned,
    )

    # 2. dK, dV: one program per key block, in one launch or two (key_block_passes)
    for kernel in tiles.key_block_passes(block_d):
        compute_dk, compute_dv = tiles.COMPUTED_GRADIENTS[kernel]
        tile = tiles.launch_tile(kernel, D, q.dtype, dropout, q.device, aligned)
        attention_backward_dkdv_kernel[(triton.cdiv(N_K, tile.block_n), B * H)](
            q, k, v, grad_out, dk, dv, lse, delta,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
            H, N_Q, N_K, scale, dropout_p, seed,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
            CAUSAL=causal, DROPOUT=dropout, COMPUTE_DK=compute_dk, COMPUTE_DV=compute_dv, ALIGNED=aligned,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )

    # 3. dQ: one program per query block
    tile = tiles.launch_tile("dq", D, q.dtype, dropout, q.device, aligned)
    attention_backward_dq_kernel[(triton.cdiv(N_Q, tile.block_m), B * H)](
        q, k, v, grad_out, dq, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
        H, N_Q, N_K, scale, dropout_p, seed,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        CAUSAL=causal, DROPOUT=dropout, ALIGNED=aligned,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return dq, dk, dv


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, causal, dropout_p, scale, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class AttentionFunction(torch.autograd.Function):
    """Autograd for attention, the one place its backward is defined: `attention` calls it, and the same
    setup_context and backward are registered on the `attention_forward` operator (torch.library), so a caller
    of the operator itself, opcheck and torch.compile all see the same formula.
    forward(q, k, v, causal, dropout_p, scale, seed): every argument explicit, the seed included, so the dropout
    mask is a function of the arguments and backward regenerates it."""

    @staticmethod
    def forward(q, k, v, causal, dropout_p, scale, seed):
        return attention_forward(q, k, v, causal, dropout_p, scale, seed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, causal, dropout_p, scale, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, seed)
        ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, seed = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.dropout_p, ctx.scale, seed)
        return dq, dk, dv, None, None, None, None


torch.library.register_autograd(
    f"{NAMESPACE}::attention_forward", AttentionFunction.backward, setup_context=AttentionFunction.setup_context
)


@torch.library.custom_op(f"{NAMESPACE}::attention_dropout_seed", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def attention_dropout_seed() -> Tensor:
    """A dropout seed, a one-element int64 CPU tensor, drawn from torch's default CPU generator:
    `torch.manual_seed(s)` reproduces it, and drawing it costs no GPU synchronisation. An operator of its own,
    tagged as random, so torch.compile neither replaces it by its own random numbers nor recomputes it in the
    backward: compiled and eager calls draw the same seed."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


@attention_dropout_seed.register_fake
def _():
    return torch.empty(1, dtype=torch.int64)
