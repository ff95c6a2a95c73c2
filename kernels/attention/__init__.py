"""Fused causal softmax attention, FlashAttention-2 style: dense and packed (variable-length) batches,
grouped-query attention, sliding windows, dropout; and decoding against a key/value cache. Layers, each in its
own file:

    api.py      attention(), attention_varlen(), the dropout-mask helpers, decode_attention(): input checks, layout,
                scale, band, seed
    ops.py      the torch.library operators that launch the kernels, and the autograd formula
    tiles.py    block sizes, warps and stages per precision, head size, kernel, GPU and operand alignment; the
                decoding tiles and split count
    forward.py  the Triton forward kernel, and the one that writes the dropout mask
    backward.py the Triton backward kernels: delta, dK/dV per key block, dQ per query block
    decode.py   the Triton decoding kernels: append to the cache, attend per key chunk (split-KV), combine
    shared.py   what the kernels share: the math they compute, program coordinates, operand alignment, tile
                loads and stores, the visible band, dropout
"""

from .api import attention, attention_dropout_mask, attention_varlen, attention_varlen_dropout_mask, decode_attention
