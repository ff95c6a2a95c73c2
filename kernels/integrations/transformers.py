"""Hugging Face transformers adapter: after `register()`,

    AutoModelForCausalLM.from_config(config, attn_implementation="decoder_kernels")

runs every attention layer of a causal language model on `kernels.attention`. The model to follow is transformers'
own flash-attention integration (transformers/integrations/flash_attention.py, modeling_flash_attention_utils.py):

- `decoder_kernels_mask`, registered in transformers' mask registry (AttentionMaskInterface), is called once per
  forward instead of building an (N x N) mask. It checks that the model asks for a pattern the kernels compute
  (causal, or causal within a sliding window) and gives the layers the padding mask of the keys, or None when
  there is nothing to mask beyond the causal band.
- `decoder_kernels_attention`, registered in its attention registry (AttentionInterface), takes transformers'
  (B, H, Nq, D) queries and (B, H_KV, Nk, D) keys and values (grouped-query heads are read in place, not
  repeated). Without a padding mask it calls `kernels.attention` on them as they are; with one it packs the
  tokens the mask keeps, calls `kernels.attention_varlen`, and scatters the result back, as transformers does for
  flash attention. It returns (B, Nq, H, D) and no attention weights.

The kernels align a causal mask bottom-right (query i of Nq sees keys j <= i + Nk - Nq): the queries are the
newest tokens and the last key is the newest query's own, as with a key/value cache. A static cache hands over
its whole preallocated buffer, whose slots past the newest token are unfilled: the mask stops before them.

What the kernels cannot compute is refused with a ValueError that names it, never ignored: a 4D or float mask
(an arbitrary bias), logit softcapping, attention sinks, attention weights (output_attentions), non-causal
attention, padding-free batches (cu_seq_lens arguments), a padding gap inside a sequence under a sliding window,
and any mask pattern other than causal or causal within a sliding window (chunked attention, packed sequences,
image-token overlays, ...).

`apply_fused_norms(model)`, an opt-in of its own, swaps a loaded model's norms for the kernels' (GPT-2's
nn.LayerNorm for FusedLayerNorm; LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm and nn.RMSNorm for FusedRMSNorm) in
place, keeping each weight Parameter itself; a norm class it does not know is refused before anything changes.

Tested with transformers 5.17 and 5.24.
"""

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
    sliding_window_causal_mask_function,
)
# What the running forward was asked to return (output_attentions=True, as an argument or in the config, puts
# "attentions" in it): the one place that knows, as some models (GPT-2) take the flag without passing it on.
from transformers.utils.output_capturing import _active_collector as _requested_outputs

from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from .._validate import check_number
from ..attention import attention, attention_varlen
from ..attention.checks import check_dropout, check_scale
from ..modules import FusedLayerNorm, FusedRMSNorm

NAME = "decoder_kernels"

# Arguments of transformers' flash-attention path for padding-free batches (sequences packed along one row).
_PACKED_BATCH_ARGUMENTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def register():
    """Add the attention implementation "decoder_kernels" to transformers: its attention function and the mask
    function that gets padding to it. Calling it again changes nothing."""
    AttentionInterface.register(NAME, decoder_kernels_attention)
    AttentionMaskInterface.register(NAME, decoder_kernels_mask)


def decoder_kernels_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
                         mask_function=causal_mask_function, attention_mask=None, local_size=None, use_vmap=False,
                         device="cpu", **unused):
    """transformers' mask-function signature (see its sdpa_mask). The layer's keys are the kv_length positions from
    kv_offset on, its queries the q_length positions from q_offset on; attention_mask is the 2D bool padding mask
    by position (False: padding), or None.

    Returns None when the causal band alone says what each query sees (no padding, no unfilled slot), else a
    (batch, n_keys) bool mask over the first n_keys keys (False: padding); the keys after those lie past the newest
    query: a static cache's unfilled slots.
    """
    if local_size is not None:
        check_number("local_size", local_size, int, lambda n: n >= 1, "a positive int (or None)")
    _check_pattern(mask_function, local_size, use_vmap, batch_size, q_length, kv_length, q_offset, kv_offset, device)
    n_keys = min(kv_length, int(q_offset + q_length - kv_offset))
    if attention_mask is None:
        padding = torch.ones(batch_size, n_keys, dtype=torch.bool, device=device)
    else:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + n_keys]
    if n_keys == kv_length and bool(padding.all()):
        return None
    if local_size is not None and local_size < n_keys and not _without_gaps(padding):
        raise ValueError("decoder_kernels cannot combine a sliding window with padding between a sequence's tokens: "
                         "once unpadded, the window would count the tokens after the gap, not their positions")
    return padding


def decoder_kernels_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              sliding_window=None, softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers' attention-function signature (see its flash_attention_forward). query: (B, H, Nq, D);
    key, value: (B, H_KV, Nk, D); attention_mask: what `decoder_kernels_mask` returned. dropout: the probability
    of dropping an attention weight, in training mode; scaling: the softmax scale (None: D ** -0.5);
    sliding_window: the module's window, in which a query sees the sliding_window keys up to its own, as in
    transformers' eager mask. Returns ((B, Nq, H, D) output, None)."""
    _refuse_what_kernels_cannot_compute(module, attention_mask, softcap, is_causal, s_aux, kwargs)
    check_dropout(dropout, name="dropout")
    check_scale(scaling, name="scaling")
    if sliding_window is not None:
        check_number("sliding_window", sliding_window, int, lambda n: n >= 1, "a positive int (or None)")
    options = {"dropout_p": dropout if module.training else 0.0,  # as eager's dropout(..., training=module.training)
               "scale": scaling, "window": (-1, -1) if sliding_window is None else (sliding_window - 1, 0)}
    if attention_mask is None:
        return attention(query, key, value, **options).transpose(1, 2), None
    return _attention_on_unpadded_tokens(query, key, value, attention_mask, options), None


def _check_pattern(mask_function, local_size, use_vmap, batch_size, q_length, kv_length, q_offset, kv_offset,
                   device):
    """Raise unless the model's mask pattern (without padding) is causal, or causal within the sliding window of
    local_size keys: what the kernels compute. transformers' plain causal pattern is known by name; any other is
    built by transformers' own sdpa_mask, as the eager and sdpa paths build it every forward, and compared."""
    if mask_function is causal_mask_function and local_size is None:
        return
    expected_function = (causal_mask_function if local_size is None
                          else sliding_window_causal_mask_function(local_size))
    sizes = {"batch_size": batch_size, "q_length": q_length, "kv_length": kv_length, "q_offset": q_offset,
             "kv_offset": kv_offset, "allow_is_causal_skip": False, "device": device}
    requested = sdpa_mask(mask_function=mask_function, use_vmap=use_vmap, **sizes)
    expected = sdpa_mask(mask_function=expected_function, **sizes)
    if not torch.equal(requested, expected):
        band = "causal" if local_size is None else f"causal within a sliding window of {local_size}"
        raise ValueError(f"the model asks for an attention mask other than the {band} one decoder_kernels computes "
                         "(chunked attention, packed sequences, bidirectional or image-token blocks, a custom "
                         "mask function, ...); use attn_implementation='sdpa' or 'eager' for this model")


def _without_gaps(padding):
    """Whether the tokens each row of a (batch, n) padding mask keeps are consecutive."""
    positions = torch.arange(padding.shape[1], device=padding.device)
    first = padding.int().argmax(dim=1, keepdim=True)
    return bool(((positions >= first) & (positions < first + padding.sum(1, keepdim=True)) == padding).all())


def _refuse_what_kernels_cannot_compute(module, attention_mask, softcap, is_causal, s_aux, kwargs):
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        raise ValueError(f"decoder_kernels got a {attention_mask.dim()}D {attention_mask.dtype} attention mask "
                         "(attention_mask): the kernels take a causal band, a sliding window and padding, not an "
                         "arbitrary mask or bias (was the model given a prepared 4D mask?); use "
                         "attn_implementation='sdpa' or 'eager'")
    if softcap is not None:
        raise ValueError(f"decoder_kernels does not softcap attention logits (softcap={softcap})")
    if s_aux is not None:
        raise ValueError("decoder_kernels has no attention sinks (s_aux)")
    if not (module.is_causal if is_causal is None else is_causal):
        source = f"{type(module).__name__}.is_causal" if is_causal is None else "is_causal"
        raise ValueError(f"decoder_kernels computes causal attention; {type(module).__name__} is not causal "
                         f"({source} is False)")
    if "attentions" in (_requested_outputs.get() or {}):
        raise ValueError("decoder_kernels never forms the attention weights, so it cannot return them "
                         "(output_attentions=True); use attn_implementation='eager'")
    packed = [name for name in _PACKED_BATCH_ARGUMENTS if kwargs.get(name) is not None]
    if packed:
        raise ValueError(f"decoder_kernels does not take padding-free batches ({', '.join(packed)}); "
                         "pass padded sequences with an attention_mask")


def _attention_on_unpadded_tokens(query, key, value, key_padding, options):
    """Attention under a (B, n_keys) padding mask over the first n_keys keys: the tokens it keeps, packed batch by
    batch, through attention_varlen; padded query rows of the output are 0, as in transformers' flash path."""
    batch, heads, n_queries, head_dim = query.shape
    query_padding = key_padding[:, -n_queries:]  # the queries are the newest tokens: the last keys
    query_rows, cu_seqlens_q, max_seqlen_q = _unpadding(query_padding)
    key_rows, cu_seqlens_k, max_seqlen_k = _unpadding(key_padding)
    n_keys = key_padding.shape[1]
    packed_q = query.transpose(1, 2)[query_rows]  # (total_q, H, D)
    packed_k, packed_v = (t[:, :, :n_keys].transpose(1, 2)[key_rows] for t in (key, value))
    packed_out = attention_varlen(packed_q, packed_k, packed_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, **options)
    out = packed_out.new_zeros(batch, n_queries, heads, head_dim)
    out[query_rows] = packed_out
    return out


def _unpadding(padding):
    """The (batch, position) indices of the tokens a (B, N) padding mask keeps, batch by batch, their int32
    cumulative lengths and the longest sequence (at least 1, as attention_varlen needs)."""
    lengths = padding.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return padding.nonzero(as_tuple=True), cu_seqlens, max(int(lengths.max()), 1)


# --------------------------------------------------------------------------------------------------------------
# The norm swap

# The RMSNorm classes of transformers' models that compute x / sqrt(mean(x^2) + variance_epsilon) * weight, with the
# statistics in fp32 (LlamaRMSNorm's forward; Qwen2's and Mistral's are copies of it).
_TRANSFORMERS_RMS_NORMS = (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm)


def apply_fused_norms(model):
    """Swap every LayerNorm and RMSNorm module of `model` for the kernels' in place, and return the model: GPT-2's
    (and any) torch.nn.LayerNorm for a FusedLayerNorm, transformers' LlamaRMSNorm, Qwen2RMSNorm and MistralRMSNorm
    and torch.nn.RMSNorm for a FusedRMSNorm. Each new module holds the old one's weight and bias Parameters
    themselves (an optimizer built before the swap keeps training them) and its eps and training mode. An opt-in of
    its own, apart from the attention implementation: call it after loading the weights.

    A module whose class name says it is a norm (it contains "Norm") but is none of those classes exactly
    (GemmaRMSNorm's 1 + weight, a subclass with its own forward, a LayerNorm over more than the last dimension) is
    refused with a ValueError naming it, before any module is swapped. The kernels' own modules are left as they
    are, so a second call changes nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    swaps = {}  # module path -> its replacement; a module shared by several paths gets one replacement
    replacements = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if "Norm" not in type(module).__name__ or isinstance(module, (FusedLayerNorm, FusedRMSNorm)):
            continue
        if id(module) not in replacements:
            replacements[id(module)] = _fused_norm(path, module)
        swaps[path] = replacements[id(module)]
    for path, fused in swaps.items():
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, fused)
    return model


def _fused_norm(path, module):
    """The kernels' module computing what `module` (at `path` in the model) computes, on its own Parameters."""
    kind = type(module)
    if kind is nn.LayerNorm and len(module.normalized_shape) == 1:
        fused = FusedLayerNorm(module.normalized_shape, module.eps, module.elementwise_affine,
                               bias=module.bias is not None, device="meta")
    elif kind is nn.RMSNorm and len(module.normalized_shape) == 1:
        fused = FusedRMSNorm(module.normalized_shape, module.eps, module.elementwise_affine, device="meta")
    elif kind in _TRANSFORMERS_RMS_NORMS and module.weight.dim() == 1:
        fused = FusedRMSNorm(module.weight.shape, module.variance_epsilon, device="meta")
    else:
        raise ValueError(
            f"apply_fused_norms cannot replace {path or 'the model'} ({kind.__module__}.{kind.__qualname__}) "
            "exactly: it swaps torch.nn.LayerNorm and torch.nn.RMSNorm over the last dimension, LlamaRMSNorm, "
            "Qwen2RMSNorm and MistralRMSNorm; nothing was swapped")
    for name, parameter in module.named_parameters(recurse=False):
        setattr(fused, name, parameter)  # the Parameter itself: the weights and any optimizer's hold on them
    return fused.train(module.training)
