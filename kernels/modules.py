"""Thin nn.Modules over the functional API: they hold parameters and call the kernels."""

import torch
import torch.nn as nn
from torch.nn import functional as F

from .flash_attention import attention

ATTENTION_MODULE_BACKENDS = ("triton", "sdpa")


class _HeadProjections(nn.Module):
    """The key, query and value projections of one head, named as in the eager `gpt.model.Head`,
    so that state dicts move between the two unchanged."""

    def __init__(self, n_embd, head_size):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)


class FusedMultiHeadAttention(nn.Module):
    """Multi-head causal self-attention, a drop-in for the eager `gpt.model.MultiHeadAttention`: the same
    parameter names and shapes (`heads.{i}.key/query/value.weight` of shape (head_size, n_embd),
    `proj.weight`, `proj.bias`), so `load_state_dict` moves weights either way.

    The per-head weights are concatenated into one (3 * n_embd, n_embd) projection: one matmul, whose output
    q, k and v are strided (B, H, T, D) views handed to the attention kernel without a copy.
    backend: "triton" runs `kernels.attention`; "sdpa" runs torch's scaled_dot_product_attention (the
    baseline the benchmarks compare against).
    dropout: on the attention weights (inside the kernel) and on the output, in training mode only.
    """

    def __init__(self, n_embd, n_head, dropout=0.0, backend="triton"):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        if backend not in ATTENTION_MODULE_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_MODULE_BACKENDS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.n_head = n_head
        self.backend = backend
        self.attention_dropout = dropout
        self.heads = nn.ModuleList([_HeadProjections(n_embd, n_embd // n_head) for _ in range(n_head)])
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        # Rows of the fused projection: every head's query, then every head's key, then every head's value.
        qkv_weight = torch.cat([getattr(h, name).weight for name in ("query", "key", "value") for h in self.heads])
        qkv = F.linear(x, qkv_weight).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D), a view into qkv
        dropout_p = self.attention_dropout if self.training else 0.0
        if self.backend == "triton":
            out = attention(q, k, v, causal=True, dropout_p=dropout_p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(B, T, C)  # heads side by side, as the eager torch.cat gives them
        return self.dropout(self.proj(out))
