"""Thin nn.Modules over the functional API: they hold parameters and call the kernels."""

import numbers

import torch
import torch.nn as nn
from torch.nn import functional as F

from ._validate import check_bool, check_number, check_tensor
from .attention import attention
from .attention.checks import check_dropout
from .decode import decode_attention
from .layer_norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .layer_norm.api import check_eps

ATTENTION_MODULE_BACKENDS = ("triton", "sdpa")
# New tokens per call up to which a call continuing a cache is a decoding step (kernels.decode_attention, made for
# a few); more run the prefill kernel against the cache.
DECODE_STEP_TOKENS = 16


class FusedMultiHeadAttention(nn.Module):
    """Multi-head causal self-attention, a drop-in for the eager `gpt.model.MultiHeadAttention`: its state dict has
    the same keys and shapes (`heads.{i}.key/query/value.weight` of shape (head_size, n_embd), `proj.weight`,
    `proj.bias`), so `load_state_dict` moves weights either way.

    The per-head projections live packed in one nn.Linear(n_embd, 3 * n_embd, bias=False), `qkv`: rows for every
    head's query, then every head's key, then every head's value. One matmul gives q, k and v as strided
    (B, H, T, D) views handed to the attention kernel without a copy; state-dict hooks split and pack the per-head
    names.
    backend: "triton" runs `kernels.attention`; "sdpa" runs torch's scaled_dot_product_attention (the baseline the
    benchmarks compare against).
    dropout: on the attention weights (inside the kernel) and on the output, in training mode only.
    """

    _PACKED_ORDER = ("query", "key", "value")  # the packed rows: every head's query, then key, then value
    _EAGER_ORDER = ("key", "query", "value")  # the eager Head's attributes, in its state-dict order

    def __init__(self, n_embd, n_head, dropout=0.0, backend="triton"):
        super().__init__()
        for name, size in (("n_embd", n_embd), ("n_head", n_head)):
            check_number(name, size, int, lambda n: n >= 1, "a positive int")
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, one of {ATTENTION_MODULE_BACKENDS}; got {type(backend).__name__}")
        if backend not in ATTENTION_MODULE_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_MODULE_BACKENDS}")
        check_dropout(dropout, name="dropout")
        self.n_embd = n_embd
        self.n_head = n_head
        self.backend = backend
        self.attention_dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)
        self.register_state_dict_post_hook(FusedMultiHeadAttention._split_heads)
        self.register_load_state_dict_pre_hook(FusedMultiHeadAttention._pack_heads)

    def _head_key(self, prefix, head, name):
        return f"{prefix}heads.{head}.{name}.weight"

    @staticmethod
    def _split_heads(module, state_dict, prefix, local_metadata):
        """qkv.weight -> the eager per-head keys, in the eager model's order (the heads, then proj)."""
        own = {key: state_dict.pop(key) for key in [key for key in state_dict if key.startswith(prefix)]}
        rows = own.pop(prefix + "qkv.weight").chunk(3 * module.n_head)
        for head in range(module.n_head):
            for name in module._EAGER_ORDER:
                state_dict[module._head_key(prefix, head, name)] = rows[
                    module._PACKED_ORDER.index(name) * module.n_head + head]
        state_dict.update(own)

    @staticmethod
    def _pack_heads(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """The eager per-head keys -> qkv.weight, when all of them are there (else load_state_dict reports the
        missing qkv.weight)."""
        keys = [module._head_key(prefix, head, name) for name in module._PACKED_ORDER for head in range(module.n_head)]
        if all(key in state_dict for key in keys):
            state_dict[prefix + "qkv.weight"] = torch.cat([state_dict.pop(key) for key in keys])

    def forward(self, x, cache=None, output_dropout=True):
        """x (B, T, C) -> (B, T, C). `cache`: a layer's key/value cache when generating (gpt/cache.py's
        LayerCache: `length` tokens cached, `store(k, v)` appends and returns every token's keys and values,
        `keys` and `values` the whole (B, H, block_size, D) storage). output_dropout=False leaves the output's
        dropout (self.dropout) to the caller, which fuses it into the next kernel (`add_layer_norm`'s dropout_p)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(f"x must be (B, T, n_embd) = (B, T, {self.n_embd}), got shape {tuple(x.shape)}")
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D), a view into qkv
        dropout_p = self.attention_dropout if self.training else 0.0
        decoding = cache is not None and cache.length and T <= DECODE_STEP_TOKENS and not dropout_p
        if decoding and self.backend == "triton":
            # the split-KV kernel appends k and v to the (prefilled) cache itself and reads it once
            out = decode_attention(q, cache.keys, cache.values, cache.length, k_new=k, v_new=v)
        else:
            if cache is not None:
                k, v = cache.store(k, v)  # the cached tokens' keys and values, then these
            if self.backend == "triton":
                out = attention(q, k, v, causal=True, dropout_p=dropout_p)  # causal aligned bottom-right
            else:
                out = _sdpa_causal(q, k, v, dropout_p)
        out = out.transpose(1, 2).reshape(B, T, C)  # heads side by side, as the eager torch.cat gives them
        out = self.proj(out)
        return self.dropout(out) if output_dropout else out


def _sdpa_causal(q, k, v, dropout_p):
    """torch's scaled_dot_product_attention with the causal mask aligned bottom-right, as the model's: its own
    is_causal aligns it top-left, which differs once keys precede the queries (a cache)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    if n_q == n_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    visible = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)


def _one_dimensional(normalized_shape, module_name):
    """normalized_shape (an int or a sequence of one int) as a one-entry tuple: the last dimension's width."""
    if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    if not isinstance(normalized_shape, (tuple, list, torch.Size)):
        raise TypeError(f"normalized_shape must be an int or a sequence of one int, got "
                        f"{type(normalized_shape).__name__}")
    normalized_shape = tuple(normalized_shape)
    if len(normalized_shape) != 1:
        raise ValueError(
            f"{module_name} normalizes the last dimension only: normalized_shape must have one entry, "
            f"got {normalized_shape}"
        )
    check_number("normalized_shape", normalized_shape[0], int, lambda n: n >= 1, "a positive int")
    return normalized_shape


def _check_width(x, normalized_shape):
    check_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] != normalized_shape[0]:
        raise ValueError(f"x must have last dimension {normalized_shape[0]} (normalized_shape), got shape "
                         f"{tuple(x.shape)}")


class FusedLayerNorm(nn.Module):
    """LayerNorm over the last dimension by the Triton kernels, a drop-in for `torch.nn.LayerNorm`: the
    same arguments, parameters (`weight` ones, `bias` zeros), state-dict keys and repr, so
    `load_state_dict` moves weights either way. Only a one-dimensional `normalized_shape` is supported.

    `add_and_norm(x, residual)` returns (layer_norm(dropout(x) + residual), dropout(x) + residual) in one kernel
    pass: the residual stream's "add, then this norm" (dropout_p and residual_in_fp32 as in `add_layer_norm`).
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None):
        super().__init__()
        normalized_shape = _one_dimensional(normalized_shape, "FusedLayerNorm")
        check_eps(eps)
        check_bool("elementwise_affine", elementwise_affine)
        check_bool("bias", bias)
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(normalized_shape, **factory))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.zeros(normalized_shape, **factory))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        _check_width(x, self.normalized_shape)
        return layer_norm(x, self.weight, self.bias, self.eps)

    def add_and_norm(self, x, residual, *, dropout_p=0.0, residual_in_fp32=False):
        _check_width(x, self.normalized_shape)
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps, dropout_p=dropout_p,
                              residual_in_fp32=residual_in_fp32)

    extra_repr = nn.LayerNorm.extra_repr  # the same attributes, so torch's own repr, whatever its version


class FusedRMSNorm(nn.Module):
    """RMSNorm over the last dimension by the Triton kernels, a drop-in for `torch.nn.RMSNorm` (and for the
    RMSNorm modules of Llama, Qwen2 and Mistral in transformers): the same arguments, parameter (`weight`), state-dict
    keys and repr, so `load_state_dict` moves weights either way. Only a one-dimensional `normalized_shape` is
    supported. eps=None is torch's default, fp32's machine epsilon.

    offset (keyword-only, not in torch's): y = x_hat * (offset + weight); 1.0 for models that store the weight
    as 1 + w (Gemma). The weight starts at 1 - offset, so that the norm starts as a plain RMSNorm either way.
    `add_and_norm(x, residual)` returns (rms_norm(dropout(x) + residual), dropout(x) + residual) in one kernel
    pass (dropout_p and residual_in_fp32 as in `add_rms_norm`).
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *, offset=0.0):
        super().__init__()
        normalized_shape = _one_dimensional(normalized_shape, "FusedRMSNorm")
        if eps is not None:
            check_eps(eps)
        check_bool("elementwise_affine", elementwise_affine)
        check_number("offset", offset, numbers.Real, lambda o: o == 0 or elementwise_affine,
                     "0 without elementwise_affine (it is added to the weight)")
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.offset = offset
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x):
        _check_width(x, self.normalized_shape)
        return rms_norm(x, self.weight, self.eps, offset=self.offset)

    def add_and_norm(self, x, residual, *, dropout_p=0.0, residual_in_fp32=False):
        _check_width(x, self.normalized_shape)
        return add_rms_norm(x, residual, self.weight, self.eps, offset=self.offset, dropout_p=dropout_p,
                            residual_in_fp32=residual_in_fp32)

    def extra_repr(self):
        """torch.nn.RMSNorm's repr, and the offset when there is one."""
        return nn.RMSNorm.extra_repr(self) + (f", offset={self.offset}" if self.offset else "")
