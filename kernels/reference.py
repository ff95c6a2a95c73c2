"""The eager math of each fused op, written plainly in PyTorch: the truth that tests compare the kernels
against (run in float64) and the "eager" competitor the benchmarks time. Every op materialises what the
kernels avoid (the Nq x Nk attention weights), which is the point of the comparison."""

import torch


def attention_reference(q, k, v, causal=True, scale=None, keep=None, dropout_p=0.0):
    """softmax(scale q k^T + mask) [* keep / (1 - dropout_p)] v, in the inputs' dtype: the per-head math of
    gpt/model.py's Head, on (B, H, N, D) tensors, with the causal mask aligned bottom-right as
    `kernels.attention` aligns it. keep: an optional boolean (B, H, Nq, Nk) dropout keep-mask.
    With causal and Nq > Nk the first Nq - Nk queries see no key; their output (and gradient) is 0."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        rows = torch.arange(n_q, device=q.device)[:, None]
        cols = torch.arange(n_k, device=q.device)[None, :]
        visible = cols <= rows + (n_k - n_q)
        sees_a_key = visible.any(-1, keepdim=True)
        # Rows that see nothing get uniform scores and are then zeroed, so no NaN reaches the gradients.
        scores = scores.masked_fill(~visible & sees_a_key, float("-inf"))
        weights = torch.softmax(scores, dim=-1) * sees_a_key
    else:
        weights = torch.softmax(scores, dim=-1)
    if keep is not None:
        weights = weights * keep / (1.0 - dropout_p)
    return weights @ v
