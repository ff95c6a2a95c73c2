"""Decoding against a key/value cache, split along the keys ("flash decoding"): a few new tokens per sequence
attend to a preallocated cache, appending their keys and values in place. Inference only: no autograd. Layers,
each in its own file:

    api.py      decode_attention(): input checks, layout, scale
    ops.py      the torch.library operator that launches the kernels
    tiles.py    the split kernel's tile per precision and head size, and the number of splits
    kernels.py  the Triton kernels: append to the cache, attend per key chunk (split-KV), combine

The kernels share the attention kernels' pieces (kernels/attention/shared.py), the online softmax included.
"""

from .api import decode_attention
