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


def check_log_sum_exp(lse, q, k, scale, causal, name="lse"):
    """A dense call's log-sum-exp, (B, H, Nq) fp32, against logsumexp of the scaled scores of the same q
    (B, H, Nq, D) and k (B, H_KV, Nk, D): in float64 the reference, in fp32 the eager result of the error rule
    (the kernels take it in fp32 whatever the inputs' dtype); -inf exactly where a row sees no key."""
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3], f"{name}: {lse.dtype} {tuple(lse.shape)}"
    n_q, n_k = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]

    def log_sum_exp(dtype):
        scores = q.to(dtype) @ k.to(dtype).repeat_interleave(group, dim=1).transpose(-2, -1) * scale
        if causal:
            seen = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
            scores = scores.masked_fill(~seen, float("-inf"))
        return torch.logsumexp(scores, dim=-1)

    reference, eager = log_sum_exp(torch.float64), log_sum_exp(torch.float32)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(reference)), f"{name}: -inf where a row sees no key"
    finite = torch.isfinite(reference)
    assert_within_error_rule(lse[finite], eager[finite], reference[finite], floor=ABSOLUTE_FLOOR[torch.float32],
                             name=name)
