"""The namespace under which the kernels are registered as PyTorch operators (torch.library.custom_op).

Registered operators are opaque to torch.compile: it calls their fake implementation to learn output
shapes, dtypes and strides, and runs the real launch unchanged, so a compiled model keeps one graph.
"""

import torch

NAMESPACE = "decoder_kernels"

# torch.library.custom_op with `tags` (the dropout seed is tagged as random) arrived in torch 2.5: say so
# plainly at import instead of failing inside a decorator.
_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
if _TORCH_VERSION < (2, 5):
    raise ImportError(f"kernels needs torch >= 2.5 (torch.library.custom_op with tags); found torch {torch.__version__}")
