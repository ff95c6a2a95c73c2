"""LayerNorm and residual-add + LayerNorm over the last dimension. Layers, each in its own file:

    api.py      layer_norm(), add_layer_norm(): input checks, the dtype the norm runs in
    ops.py      the torch.library operators that launch the kernels, and the autograd formula
    tiles.py    rows per program, columns per tile, streaming and warps from the row width
    kernels.py  the Triton kernels: one-tile rows and streamed rows, forward and backward
"""

from .api import add_layer_norm, layer_norm
