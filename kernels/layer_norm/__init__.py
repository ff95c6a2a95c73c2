"""LayerNorm and residual-add + LayerNorm over the last dimension. Layers, each in its own file:

    api.py       layer_norm(), add_layer_norm(): input checks, the dtype the norm runs in
    ops.py       the torch.library operators that launch the kernels, and the autograd formula
    tiles.py     the launch table (rows per tile, columns, warps, programs per multiprocessor) and the grids
    shared.py    what the kernels share: the math, each program's run of rows, the input sum
    forward.py   the forward kernels: rows held in registers, and streamed rows
    backward.py  the backward kernels: rows held in registers, streamed rows in two column-tiled passes, and the
                 deterministic sum of the dweight / dbias partial rows
"""

from .api import add_layer_norm, layer_norm
