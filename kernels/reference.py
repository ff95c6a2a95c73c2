"""The eager math of each fused op, written plainly in PyTorch: the truth that tests compare the kernels
against (run in float64) and the "eager" competitor the benchmarks time. Every op materialises what the
kernels avoid (the Nq x Nk attention weights), which is the point of the comparison."""

import torch


def attention_reference(q, k, v, causal=True, scale=None, keep=None, dropout_p=0.0, window=(-1, -1)):
    """softmax(scale q k^T + mask) [* keep / (1 - dropout_p)] v, in the inputs' dtype: the per-head math of
    gpt/model.py's Head, on (B, H, N, D) tensors, with the masks aligned bottom-right as `kernels.attention` aligns
    them. k and v may have fewer heads than q (grouped-query attention): each is repeated for its group.
    causal: query i sees keys j <= i + Nk - Nq. window: (left, right), query i sees keys
    i + Nk - Nq - left <= j <= i + Nk - Nq + right, -1 for an unbounded side.
    keep: an optional boolean (B, H, Nq, Nk) dropout keep-mask.
    A query that sees no key outputs 0 (and gets zero gradients)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    n_q, n_k = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    relative = (torch.arange(n_k, device=q.device)[None, :] - torch.arange(n_q, device=q.device)[:, None]
                - (n_k - n_q))  # j - (i + Nk - Nq)
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    visible = torch.ones_like(relative, dtype=torch.bool)
    if left >= 0:
        visible &= relative >= -left
    if right >= 0:
        visible &= relative <= right
    sees_a_key = visible.any(-1, keepdim=True)
    # Rows that see nothing get uniform scores and are then zeroed, so no NaN reaches the gradients.
    scores = scores.masked_fill(~visible & sees_a_key, float("-inf"))
    weights = torch.softmax(scores, dim=-1) * sees_a_key
    if keep is not None:
        weights = weights * keep / (1.0 - dropout_p)
    return weights @ v
