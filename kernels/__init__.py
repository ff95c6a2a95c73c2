"""Fused Triton kernels for decoder-only transformers."""

from .flash_attention import attention, attention_dropout_mask
from .modules import FusedMultiHeadAttention
