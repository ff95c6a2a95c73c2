"""Fused causal softmax attention, FlashAttention-2 style. Layers, each in its own file:

    api.py      attention(), attention_dropout_mask(): input checks, scale, dropout seed
    ops.py      the torch.library operators that launch the kernels, and the autograd formula
    tiles.py    block sizes, warps and stages per precision, head size, kernel, GPU and operand alignment
    forward.py  the Triton forward kernel, and the one that writes the dropout mask
    backward.py the Triton backward kernels: delta, dK/dV per key block, dQ per query block
    shared.py   what the kernels share: the math they compute, operand alignment, tile loads and stores,
                dropout, causal ranges
"""

from .api import attention, attention_dropout_mask
