"""The decoder of the reference design: a character-level GPT.

The eager modules in this file (`Head`, `MultiHeadAttention`, `FeedForward`, `Block`, `GPT`) are the
project's reference: every fused backend must load their state dict and reproduce their outputs.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt.cache import KVCache

ATTENTION_BACKENDS = ("eager", "triton", "sdpa")  # sdpa: torch.nn.functional.scaled_dot_product_attention
LAYERNORM_BACKENDS = ("eager", "triton")


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256
    n_embd: int = 384
    n_head: int = 6
    n_layer: int = 6
    dropout: float = 0.2
    attention: str = "eager"  # one of ATTENTION_BACKENDS
    layernorm: str = "eager"  # one of LAYERNORM_BACKENDS

    def __post_init__(self):
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention!r}; choose one of {ATTENTION_BACKENDS}")
        if self.layernorm not in LAYERNORM_BACKENDS:
            raise ValueError(f"unknown layernorm backend {self.layernorm!r}; choose one of {LAYERNORM_BACKENDS}")
        for name in ("vocab_size", "block_size", "n_embd", "n_head", "n_layer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


class Head(nn.Module):
    """One head of causal self-attention."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.key = nn.Linear(config.n_embd, config.head_size, bias=False)
        self.query = nn.Linear(config.n_embd, config.head_size, bias=False)
        self.value = nn.Linear(config.n_embd, config.head_size, bias=False)
        # Not persistent: the mask is derived from block_size, so it stays out of the state dict
        # and checkpoints move freely between backends.
        self.register_buffer("tril", torch.tril(torch.ones(config.block_size, config.block_size)), persistent=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        k = self.key(x)  # (B, T, hs)
        q = self.query(x)  # (B, T, hs)
        v = self.value(x)  # (B, T, hs)
        start = 0  # position of the first of these T tokens: after the cached ones when generating with a cache
        if cache is not None:
            start = cache.length
            k, v = cache.store(k, v)  # (B, start + T, hs): the cached tokens' keys and values, then these
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5  # (B, T, start + T): affinities between tokens
        # the future does not talk to the past
        wei = wei.masked_fill(self.tril[start : start + T, : start + T] == 0, float("-inf"))
        wei = F.softmax(wei, dim=-1)
        wei = self.dropout(wei)
        return wei @ v  # (B, T, hs)


class MultiHeadAttention(nn.Module):
    """`n_head` heads of self-attention in parallel, concatenated and projected."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads = nn.ModuleList([Head(config) for _ in range(config.n_head)])
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, output_dropout=True):
        """output_dropout=False leaves the output's dropout to the caller (a Block fuses it into its add + ln2)."""
        out = torch.cat([h(x, cache and cache.head(i)) for i, h in enumerate(self.heads)], dim=-1)
        out = self.proj(out)
        return self.dropout(out) if output_dropout else out


class FeedForward(nn.Module):
    """Position-wise computation: a linear layer, a non-linearity, and a projection back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.ReLU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.dropout),
        )

    def forward(self, x):
        return self.net(x)


def make_attention(config: GPTConfig) -> nn.Module:
    if config.attention in ("triton", "sdpa"):
        from kernels import FusedMultiHeadAttention

        return FusedMultiHeadAttention(config.n_embd, config.n_head, dropout=config.dropout, backend=config.attention)
    return MultiHeadAttention(config)


def make_layernorm(config: GPTConfig) -> nn.Module:
    if config.layernorm == "triton":
        from kernels import FusedLayerNorm

        return FusedLayerNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd)


class Block(nn.Module):
    """Communication (self-attention) followed by computation (feed-forward), both pre-norm and residual."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.sa = make_attention(config)
        self.ffwd = FeedForward(config)
        self.ln1 = make_layernorm(config)
        self.ln2 = make_layernorm(config)
        # The Triton norm also fuses the attention output's dropout and the residual add before ln2 into its kernel
        # pass.
        self.fused_add_norm = config.layernorm == "triton"

    def forward(self, x, cache=None):
        if self.fused_add_norm:
            dropout_p = self.sa.dropout.p if self.sa.dropout.training else 0.0
            h, x = self.ln2.add_and_norm(self.sa(self.ln1(x), cache, output_dropout=False), x, dropout_p=dropout_p)
            return x + self.ffwd(h)
        x = x + self.sa(self.ln1(x), cache)
        x = x + self.ffwd(self.ln2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # Check on every forward that token ids lie in the vocabulary, for a clear error instead of an embedding
        # failure. On a GPU that reads the range back: one device synchronisation per forward, and none is allowed
        # inside a CUDA graph. A caller whose ids cannot be out of range turns it off (gpt-train does: its batches
        # come from its own tokenizer).
        self.check_token_ids = True
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.n_layer)])
        self.ln_f = make_layernorm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.apply(self._init_weights)
        self.register_load_state_dict_pre_hook(self._ignore_saved_causal_masks)

    @staticmethod
    def _ignore_saved_causal_masks(module, state_dict, prefix, *_):
        """The seed's gpt.py saved each head's causal mask (`blocks.{i}.sa.heads.{j}.tril`) in its state dict.
        Our heads derive the mask from block_size (the fused ones need none), so such entries are dropped here,
        above every attention backend, and the seed's checkpoints load strictly into any of them."""
        saved_mask = re.compile(re.escape(prefix) + r"blocks\.\d+\.sa\.heads\.\d+\.tril")
        for key in [key for key in state_dict if saved_mask.fullmatch(key)]:
            del state_dict[key]

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_input(self, idx, targets, cached=0):
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise TypeError(f"idx must be a tensor of int64 or int32 token ids, got {got}")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {tuple(idx.shape)}")
        T = idx.shape[1]
        if not 1 <= T <= self.config.block_size - cached:
            after = f" after the {cached} cached tokens" if cached else ""
            raise ValueError(f"sequence length {T} must be between 1 and block_size ({self.config.block_size}){after}")
        self._check_range("token ids", idx)
        if idx.device != self.lm_head.weight.device:
            raise ValueError(f"idx is on {idx.device} but the model is on {self.lm_head.weight.device}")
        if targets is None:
            return
        if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
            got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise TypeError(f"targets must be a tensor of int64 or int32 token ids, got {got}")
        if targets.shape != idx.shape or targets.device != idx.device:
            raise ValueError(
                f"targets ({tuple(targets.shape)} on {targets.device}) must match "
                f"idx ({tuple(idx.shape)} on {idx.device})"
            )
        self._check_range("targets", targets)

    def _check_range(self, name, ids):
        # Reading the range back from the device would break a torch.compile graph: compiled code skips it.
        if not self.check_token_ids or torch.compiler.is_compiling() or not ids.numel():
            return
        low, high = torch.stack(torch.aminmax(ids)).tolist()  # one device sync for both
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"{name} must lie in [0, {self.config.vocab_size}), got range [{low}, {high}]")

    def forward(self, idx, targets=None, cache=None):
        """Logits (B, T, vocab_size) of the tokens `idx` (B, T), and the loss against `targets` when given. With a
        `KVCache` (gpt/cache.py) the tokens continue the cached ones: their positions follow, every layer reads
        the cached keys and values and stores the new ones, and the cache's length advances by T."""
        start = 0 if cache is None else cache.length
        self._check_input(idx, targets, start)
        B, T = idx.shape
        tok_emb = self.token_embedding_table(idx)  # (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(start, start + T, device=idx.device))  # (T, C)
        x = tok_emb + pos_emb
        for i, block in enumerate(self.blocks):
            x = block(x, cache and cache.layer(i))
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T).long())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Extend `idx` (B, T) by `max_new_tokens` tokens, sampling each from the model's distribution.

        The model sees at most the last block_size tokens, at positions 0 ... block_size - 1. With use_cache
        (gpt/cache.py) the context is run once and then each new token alone against the cached keys and values,
        exactly what recomputing the context gives, while the context fits block_size. Past it every position
        shifts with each new token, so no cached key stays valid: each token then re-runs the last block_size
        tokens, as use_cache=False does for every token."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        cache = KVCache.for_model(self.config) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is None or cache.length == 0 or idx.shape[1] > self.config.block_size:
                if cache is not None:
                    cache.reset()
                logits, _ = self(idx[:, -self.config.block_size :], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)  # the newest token, after the cached ones
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
