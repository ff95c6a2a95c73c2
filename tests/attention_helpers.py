"""What the attention tests share: random inputs, values with gradients, and the check of a fused call against
the float64 eager reference by the error rule."""

import torch
from conftest import ABSOLUTE_FLOOR, assert_within_error_rule

from kernels import attention
from kernels.reference import attention_reference


def make_inputs(B, H, n_q, n_k, D, dtype, device, magnitude=1.0, kv_heads=None):
    """q (B, H, Nq, D), k and v (B, kv_heads or H, Nk, D), leaves that require grad."""
    kv_heads = H if kv_heads is None else kv_heads
    q = torch.randn(B, H, n_q, D, device=device) * magnitude
    k = torch.randn(B, kv_heads, n_k, D, device=device) * magnitude
    v = torch.randn(B, kv_heads, n_k, D, device=device)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def values_and_grads(fn, inputs, grad_out):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return [out, *grads]


def check_against_reference(q, k, v, grad_out=None, causal=True, scale=None, keep=None, dropout_p=0.0,
                            window=(-1, -1), floor_scale=1.0, **attention_kwargs):
    """Fused (out, dq, dk, dv) vs the float64 eager reference, by the error rule against eager run in the inputs'
    dtype; `floor_scale` multiplies the rule's absolute floor (for inputs far from magnitude 1)."""
    dtype = q.dtype
    if grad_out is None:
        grad_out = torch.randn(q.shape, device=q.device, dtype=dtype)
    options = dict(causal=causal, scale=scale, dropout_p=dropout_p, window=window)
    fused = values_and_grads(lambda q, k, v: attention(q, k, v, **options, **attention_kwargs), (q, k, v), grad_out)

    def eager(*inputs):
        return attention_reference(*inputs, keep=keep, **options)

    reference = values_and_grads(eager, [t.double() for t in (q, k, v)], grad_out.double())
    low = values_and_grads(eager, (q, k, v), grad_out)
    for name, f, e, r in zip(("out", "dq", "dk", "dv"), fused, low, reference):
        assert f.dtype == dtype, f"{name} has dtype {f.dtype}"
        assert_within_error_rule(f, e, r, floor=ABSOLUTE_FLOOR[dtype] * floor_scale, name=name)
    return fused
