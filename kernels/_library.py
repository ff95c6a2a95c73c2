"""The namespace under which the kernels are registered as PyTorch operators (torch.library.custom_op).

Registered operators are opaque to torch.compile: it calls their fake implementation to learn output
shapes, dtypes and strides, and runs the real launch unchanged, so a compiled model keeps one graph.
"""

NAMESPACE = "decoder_kernels"
