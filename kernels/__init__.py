"""Fused Triton kernels for decoder-only transformers."""

from .flash_attention import attention, attention_dropout_mask
from .layer_norm import add_layer_norm, layer_norm
from .modules import FusedLayerNorm, FusedMultiHeadAttention
