"""How a launch becomes a PyTorch operator, the two routes a call takes to it, and the operators' CPU
implementation.

Every launch is registered as an operator (torch.library.custom_op, namespace decoder_kernels): a schema, a fake
implementation giving output shapes, dtypes and strides, and the autograd formula. torch.compile sees each one as
an opaque node and runs the real launch unchanged, so a compiled model keeps one graph; opcheck tests them.

That machinery costs the host more than a small kernel runs on the GPU: the dispatcher, custom_op's generated
autograd wrapper and its schema handling, on every forward and again on every backward. So a call takes one of
two routes to the same launch (`Operator`):
- traced (under torch.compile or torch.export, a dispatch mode, a torch.func transform: `traced`): the registered
  operator, its autograd formula registered on it;
- plain eager: the operator's body, called directly, inside a plain torch.autograd.Function whose forward and
  backward are the same formula (`differentiable`). That costs about what one of torch's own ops costs.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which multiplies bf16 tiles wrongly. An
operator's CPU implementation (`bf16_in_fp32`) computes a bf16 call on fp32 copies, on both routes: the one place
that knows, so no public function branches on it.
"""

import torch
from torch.autograd.function import once_differentiable

NAMESPACE = "decoder_kernels"

# torch.library.custom_op with `tags` (the dropout seed is tagged as random) arrived in torch 2.5: say so
# plainly at import instead of failing inside a decorator.
_TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
if _TORCH_VERSION < (2, 5):
    raise ImportError(f"kernels needs torch >= 2.5 (torch.library.custom_op with tags); found torch {torch.__version__}")


def traced():
    """Whether calls must go through the registered operators: while torch.compile or torch.export trace, under any
    dispatch mode (AOTAutograd's and make_fx's tracing, FakeTensorMode, a user's mode: each sees our operators as
    operators) and under torch.func transforms. Otherwise a call is plain eager."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active())


class Operator:
    """One launch on both routes: `op`, the registered operator, and `eager(*args)`, what a plain eager call runs
    instead (the body for the first argument's device). Calling an Operator takes the route of the moment."""

    def __init__(self, name, op, eager):
        self.name = name
        self.op = op
        self.eager = eager

    def __call__(self, *args, **kwargs):
        if traced():
            return self.op(*args, **kwargs)
        return self.eager(*args, **kwargs)


def operator(name, launch, *, fake, cpu=None, eager=None, eager_cpu=None, mutates_args=(), tags=()):
    """Register `launch` (its type hints give the schema) as decoder_kernels::`name`, with `fake` as its fake
    implementation and `cpu` as its implementation for CPU tensors. The eager route calls `eager` (default
    `launch`) on CUDA tensors and `eager_cpu` (default `cpu`, else the CUDA one) on CPU tensors: each must
    return what the operator returns, except that an output the operator must fill in with an empty tensor may be
    None."""
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", launch, mutates_args=mutates_args, tags=tags)
    op.register_fake(fake)
    if cpu is not None:
        op.register_kernel("cpu")(cpu)
    on_cuda = eager or launch
    on_cpu = eager_cpu or cpu or on_cuda
    if on_cpu is on_cuda:
        return Operator(name, op, on_cuda)
    return Operator(name, op, lambda *args, **kwargs: (on_cuda if args[0].is_cuda else on_cpu)(*args, **kwargs))


def differentiable(forward, setup_context, backward):
    """The Operator `forward` with its autograd formula on both routes: registered on its operator (what
    torch.compile traces, and what opcheck checks), and a torch.autograd.Function around its eager body.
    setup_context(ctx, inputs, output) and backward(ctx, *grads) have register_autograd's meaning; backward calls
    Operators, so it takes the route its caller is on."""
    forward.op.register_autograd(backward, setup_context=setup_context)

    def eager_forward(ctx, *inputs):
        output = forward.eager(*inputs)
        setup_context(ctx, inputs, output)
        return output

    # once_differentiable: a second backward through the launches raises, as the operators' does.
    function = type(forward.name, (torch.autograd.Function,),
                    dict(forward=staticmethod(eager_forward), backward=staticmethod(once_differentiable(backward))))
    return Operator(forward.name, forward.op, function.apply)


# Integer arithmetic for the launchers: triton.cdiv and triton.next_power_of_2 are constexpr functions in Triton
# 3.6, whose wrapper costs about 20 times the arithmetic on every launch.


def cdiv(a, b):
    """ceil(a / b) for non-negative ints."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n, for n >= 1."""
    return 1 << (n - 1).bit_length()


def _is_bf16(argument):
    return isinstance(argument, torch.Tensor) and argument.dtype == torch.bfloat16


def bf16_in_fp32(launch, fp32_outputs=()):
    """`launch` (a tensor, or a tuple of tensors, from tensors and scalars) for the interpreter: a bf16 call (its
    first argument bf16: the operators' floating inputs share one dtype) runs on fp32 copies of its bf16 tensors,
    and its outputs are rounded to bf16 (exactly what the bf16 kernels return, up to the products' rounding),
    except those numbered in fp32_outputs (statistics that are fp32 anyway). Other calls run unchanged, at the
    cost of one dtype test. Nothing written into an argument reaches the caller's bf16 tensor."""

    def on_cpu(*args):
        if not _is_bf16(args[0]):
            return launch(*args)
        outputs = launch(*(argument.float() if _is_bf16(argument) else argument for argument in args))
        if isinstance(outputs, torch.Tensor):
            return outputs.to(torch.bfloat16)
        return tuple(out if i in fp32_outputs else out.to(torch.bfloat16) for i, out in enumerate(outputs))

    return on_cpu
