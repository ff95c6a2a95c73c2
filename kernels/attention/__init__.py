"""Fused causal softmax attention, FlashAttention-2 style: dense and packed (variable-length) batches,
grouped-query attention, sliding windows, dropout. Layers, each in its own file:

    api.py           attention(), attention_varlen(): layout, scale, band, seed
    dropout_mask.py  attention_dropout_mask(), attention_varlen_dropout_mask(): the masks those apply
    checks.py        the argument checks of both (and of decode_attention's heads and scale)
    ops.py           the torch.library operators that launch the kernels, the autograd formula, and the
                     dropout-mask kernel's launcher
    tiles.py         block sizes, warps and stages per precision, head size, kernel, GPU and operand alignment
    forward.py       the Triton forward kernel, and the one that writes the dropout mask
    backward.py      the Triton backward kernels: delta, dK/dV per key block, dQ per query block
    shared.py        what the kernels share (decoding's too): the math they compute, program coordinates, operand
                     alignment, tile loads and stores, the visible band, dropout, the online softmax
"""

from .api import attention, attention_varlen
from .dropout_mask import attention_dropout_mask, attention_varlen_dropout_mask
