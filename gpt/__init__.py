"""The reference decoder: a character-level GPT whose attention and LayerNorm can run on our Triton kernels."""

from gpt.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
