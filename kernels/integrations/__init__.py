"""Adapters that plug the kernels into other libraries' call sites. Each is imported on its own
(`import kernels.integrations.transformers`); transformers.py needs that library (an optional extra of this
package), flash_attn.py only mirrors FlashAttention's signatures and needs nothing beyond the kernels."""
