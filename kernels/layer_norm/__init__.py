"""LayerNorm and RMSNorm over the last dimension, each alone or after a residual add (with dropout on the branch),
on one set of kernels. Layers, each in its own file:

    api.py       layer_norm(), add_layer_norm(), rms_norm(), add_rms_norm(), add_norm_dropout_mask(): input checks,
                 the dtype the norm runs in, the dropout seed
    ops.py       the torch.library operators that launch the kernels, and the autograd formula
    tiles.py     the launch table (rows per tile, columns, warps, programs per multiprocessor) and the grids
    shared.py    what the kernels share: the math, each program's run of rows, the input sum
    forward.py   the forward kernels: rows held in registers, and streamed rows
    backward.py  the backward kernels: rows held in registers, streamed rows in two column-tiled passes, and the
                 deterministic sum of the dweight / dbias partial rows
"""

from .api import add_layer_norm, add_norm_dropout_mask, add_rms_norm, layer_norm, rms_norm
