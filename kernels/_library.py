"""The namespace under which the kernels are registered as PyTorch operators (torch.library.custom_op), and the
operators' CPU implementation.

Registered operators are opaque to torch.compile: it calls their fake implementation to learn output
shapes, dtypes and strides, and runs the real launch unchanged, so a compiled model keeps one graph.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which multiplies bf16 tiles wrongly. Each
operator registers a CPU implementation (`bf16_in_fp32`) that computes a bf16 call on fp32 copies: the one place
that knows, so no public function branches on it.
"""

import torch

NAMESPACE = "decoder_kernels"

# torch.library.custom_op with `tags` (the dropout seed is tagged as random) arrived in torch 2.5: say so
# plainly at import instead of failing inside a decorator.
_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
if _TORCH_VERSION < (2, 5):
    raise ImportError(f"kernels needs torch >= 2.5 (torch.library.custom_op with tags); found torch {torch.__version__}")


def _is_bf16(argument):
    return isinstance(argument, torch.Tensor) and argument.dtype == torch.bfloat16


def bf16_in_fp32(launch, fp32_outputs=()):
    """`launch` (a tensor, or a tuple of tensors, from tensors and scalars) for the interpreter: a call with bf16
    tensors runs on fp32 copies of them, and its outputs are rounded to bf16 (exactly what the bf16 kernels
    return, up to the products' rounding), except those numbered in fp32_outputs (statistics that are fp32
    anyway). Other calls run unchanged. Nothing written into an argument reaches the caller's bf16 tensor."""

    def on_cpu(*args):
        if not any(_is_bf16(argument) for argument in args):
            return launch(*args)
        outputs = launch(*(argument.float() if _is_bf16(argument) else argument for argument in args))
        if isinstance(outputs, torch.Tensor):
            return outputs.to(torch.bfloat16)
        return tuple(out if i in fp32_outputs else out.to(torch.bfloat16) for i, out in enumerate(outputs))

    return on_cpu
