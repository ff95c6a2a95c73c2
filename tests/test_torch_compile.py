"""The kernels as PyTorch operators: opcheck of every registered op, and torch.compile(fullgraph=True) of the
functional API and of the GPT with both fused backends (no graph break, same values and gradients), with
dropout reproducible across compiled and eager runs, and the same gradients through the eager route (the bodies
in an autograd.Function) and the compiled one (the operators).

On CPU the compiler backend is "aot_eager" (Inductor would need a C++ toolchain and still could not run the
interpreted kernels inside its own code); on CUDA the default Inductor backend is checked too.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import LOW_PRECISION_DTYPES, assert_within_error_rule, grads_by_state_dict_name

import kernels
from gpt.model import GPT, GPTConfig
from kernels._library import NAMESPACE
from kernels.reference import attention_reference

COMPILE_BACKENDS = ["aot_eager", "inductor"] if torch.cuda.is_available() else ["aot_eager"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ops():
    return {name: getattr(getattr(torch.ops, NAMESPACE), name) for name in dir(getattr(torch.ops, NAMESPACE))}


def test_every_operator_is_registered():
    assert {
        "attention_forward",
        "attention_backward",
        "attention_dropout_seed",
        "layer_norm_forward",
        "layer_norm_backward",
    } <= set(_ops())


# --------------------------------------------------------------------------------------------------
# opcheck: schema, fake tensors, autograd registration, AOT dispatch


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION_DTYPES])
@pytest.mark.parametrize("window, dropout_p, n_q, n_k, kv_heads", [
    ((-1, 0), 0.0, 17, 17, 2), ((-1, -1), 0.3, 5, 20, 1), ((6, 0), 0.0, 20, 9, 2)])
def test_opcheck_attention(device, dtype, window, dropout_p, n_q, n_k, kv_heads):
    ops = _ops()
    q = torch.randn(1, 2, n_q, 24, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, kv_heads, n_k, 24, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, kv_heads, n_k, 24, device=device, dtype=dtype, requires_grad=True)
    seed = ops["attention_dropout_seed"](q) if dropout_p else None
    scalars = (None, None, n_q, n_k, *window, dropout_p, 24**-0.5, seed)
    torch.library.opcheck(ops["attention_forward"], (q, k, v, *scalars))
    out, lse = ops["attention_forward"](q.detach(), k.detach(), v.detach(), *scalars)
    torch.library.opcheck(ops["attention_backward"],
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, *scalars))


def test_opcheck_packed_attention(device):
    ops = _ops()
    cu_seqlens = torch.tensor([0, 5, 5, 17], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(17, 2, 16, device=device, requires_grad=True) for _ in range(3))
    scalars = (cu_seqlens, cu_seqlens, 12, 12, 4, 0, 0.0, 0.25, None)
    torch.library.opcheck(ops["attention_forward"], (q, k, v, *scalars))
    out, lse = ops["attention_forward"](q.detach(), k.detach(), v.detach(), *scalars)
    torch.library.opcheck(ops["attention_backward"],
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, *scalars))


def test_opcheck_dropout_seed(device):
    torch.library.opcheck(_ops()["attention_dropout_seed"], (torch.empty(1, device=device),))


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION_DTYPES])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_layer_norm(device, dtype, with_residual, affine):
    ops = _ops()
    x = torch.randn(3, 5, 40, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True) if with_residual else None
    weight = torch.randn(40, device=device, dtype=dtype, requires_grad=True) if affine else None
    bias = torch.randn(40, device=device, dtype=dtype, requires_grad=True) if affine else None
    torch.library.opcheck(ops["layer_norm_forward"], (x, residual, weight, bias, 1e-5))
    y, s, mean, rstd = ops["layer_norm_forward"](x.detach(), None if residual is None else residual.detach(),
                                                 None if weight is None else weight.detach(),
                                                 None if bias is None else bias.detach(), 1e-5)
    normalized = s if with_residual else x.detach()
    dy = torch.randn_like(y)
    dsum = torch.randn_like(y) if with_residual else None
    torch.library.opcheck(
        ops["layer_norm_backward"],
        (dy, dsum, normalized, None if weight is None else weight.detach(), mean, rstd, affine, affine),
    )


# --------------------------------------------------------------------------------------------------
# fullgraph compile of the functional API


def _values_and_grads(fn, inputs, requires_grad=None):
    """fn's outputs and the gradients of its inputs (those flagged in requires_grad, every one by default)."""
    requires_grad = requires_grad or [True] * len(inputs)
    inputs = [t.detach().clone().requires_grad_(flag) for t, flag in zip(inputs, requires_grad)]
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, [torch.ones_like(o) * 0.5 + o.detach() * 0.1 for o in outputs])
    return [o.detach() for o in outputs], [t.grad for t in inputs]


def _assert_compiled_matches(fn, reference, inputs, backend):
    """The compiled fn against the eager fn (the same kernels run in both: the results agree to the last bit, or
    nearly, where Inductor fuses the surrounding elementwise work differently), and against `reference`, the
    eager math, by the float64 error rule: a compiled graph that fed the kernels wrong inputs fails the second."""
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    eager_out, eager_grads = _values_and_grads(fn, inputs)
    compiled_out, compiled_grads = _values_and_grads(compiled, inputs)
    for expected, actual in zip(eager_out + eager_grads, compiled_out + compiled_grads):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    low_out, low_grads = _values_and_grads(reference, inputs)
    reference_out, reference_grads = _values_and_grads(reference, [t.double() for t in inputs])
    for actual, low, exact in zip(compiled_out + compiled_grads, low_out + low_grads, reference_out + reference_grads):
        assert_within_error_rule(actual, low, exact)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION_DTYPES])
def test_compiled_attention(device, backend, dtype):
    q, k, v = (torch.randn(2, 2, 19, 32, device=device, dtype=dtype) for _ in range(3))
    _assert_compiled_matches(lambda q, k, v: kernels.attention(q, k, v, causal=True), attention_reference, (q, k, v),
                             backend)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION_DTYPES])
def test_compiled_layer_norms(device, backend, dtype):
    x, residual = (torch.randn(4, 7, 48, device=device, dtype=dtype) for _ in range(2))
    weight, bias = (torch.randn(48, device=device, dtype=dtype) for _ in range(2))

    def add_then_norm(x, residual, weight, bias):
        s = x + residual
        return F.layer_norm(s, (48,), weight, bias), s

    _assert_compiled_matches(kernels.layer_norm, lambda x, w, b: F.layer_norm(x, (48,), w, b), (x, weight, bias),
                             backend)
    _assert_compiled_matches(kernels.add_layer_norm, add_then_norm, (x, residual, weight, bias), backend)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_dropout_is_reproducible(device, backend):
    q, k, v = (torch.randn(1, 2, 33, 16, device=device) for _ in range(3))

    def attend(q, k, v):
        return kernels.attention(q, k, v, dropout_p=0.4)

    compiled = torch.compile(attend, fullgraph=True, backend=backend)
    torch.manual_seed(7)
    eager_out, eager_grads = _values_and_grads(attend, (q, k, v))
    torch.manual_seed(7)
    compiled_out, compiled_grads = _values_and_grads(compiled, (q, k, v))
    for expected, actual in zip(eager_out + eager_grads, compiled_out + compiled_grads):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # A second compiled call draws a new seed, as a second eager call would.
    torch.manual_seed(7)
    first, second = compiled(q, k, v), compiled(q, k, v)
    assert not torch.equal(first, second)


def _route_cases(device):
    """name -> (fn, inputs, which inputs require grad): every differentiable public function, in the variants whose
    backward differs (grouped heads, a window, dropout with a given seed, packed sequences, a frozen weight, no
    bias)."""
    q = torch.randn(2, 4, 19, 16, device=device)
    k, v = (torch.randn(2, 2, 23, 16, device=device) for _ in range(2))
    packed = [torch.randn(21, 2, 16, device=device) for _ in range(3)]
    cu_seqlens = torch.tensor([0, 8, 21], dtype=torch.int32, device=device)
    x, residual = (torch.randn(4, 7, 48, device=device) for _ in range(2))
    weight, bias = (torch.randn(48, device=device) for _ in range(2))
    return {
        "attention: grouped, windowed, dropout": (
            lambda q, k, v: kernels.attention(q, k, v, window=(5, 0), dropout_p=0.3, seed=11), (q, k, v), None),
        "attention_varlen": (lambda q, k, v: kernels.attention_varlen(q, k, v, cu_seqlens, cu_seqlens, 13, 13),
                             packed, None),
        "layer_norm: no bias": (lambda x, w: kernels.layer_norm(x, w), (x, weight), None),
        "add_layer_norm: weight frozen": (kernels.add_layer_norm, (x, residual, weight, bias),
                                          [True, True, False, True]),
    }


@pytest.mark.parametrize("case", ["attention: grouped, windowed, dropout", "attention_varlen", "layer_norm: no bias",
                                  "add_layer_norm: weight frozen"])
def test_eager_and_compiled_routes_give_the_same_gradients(device, case):
    """Eager calls run the bodies in an autograd.Function, compiled ones the registered operators and their
    autograd formula: the same values and the same gradient for every input, None where none is asked for."""
    fn, inputs, requires_grad = _route_cases(device)[case]
    eager_out, eager_grads = _values_and_grads(fn, inputs, requires_grad)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    compiled_out, compiled_grads = _values_and_grads(compiled, inputs, requires_grad)
    assert [g is None for g in compiled_grads] == [g is None for g in eager_grads]
    assert all(g is not None for g, flag in zip(eager_grads, requires_grad or [True] * len(inputs)) if flag)
    for expected, actual in zip(eager_out + eager_grads, compiled_out + compiled_grads):
        if expected is not None:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The GPT with both fused backends, compiled whole


TINY = dict(vocab_size=23, block_size=16, n_embd=32, n_head=2, n_layer=2, dropout=0.0)


def _gpt_logits_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    logits, loss = model(idx, targets)
    loss.backward()
    return logits.detach(), grads_by_state_dict_name(model)


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_fused_gpt_matches_eager(device, backend):
    generator = torch.Generator().manual_seed(0)
    eager = GPT(GPTConfig(**TINY)).to(device)
    fused = GPT(GPTConfig(**TINY, attention="triton", layernorm="triton")).to(device)
    fused.load_state_dict(eager.state_dict())
    reference = GPT(GPTConfig(**TINY)).to(device).double()
    reference.load_state_dict(eager.state_dict())
    idx = torch.randint(0, TINY["vocab_size"], (2, 13), generator=generator).to(device)
    targets = torch.randint(0, TINY["vocab_size"], (2, 13), generator=generator).to(device)

    compiled = torch.compile(fused, fullgraph=True, backend=backend)
    compiled_logits, compiled_grads = _gpt_logits_and_grads(compiled, idx, targets)
    eager_logits, eager_grads = _gpt_logits_and_grads(eager, idx, targets)
    reference_logits, reference_grads = _gpt_logits_and_grads(reference, idx, targets)

    assert_within_error_rule(compiled_logits, eager_logits, reference_logits, name="logits")
    for name in reference_grads:
        grad_name = name if name in compiled_grads else f"_orig_mod.{name}"
        assert_within_error_rule(compiled_grads[grad_name], eager_grads[name], reference_grads[name], name=name)


def test_no_graph_break_in_fused_gpt_forward_and_backward(device):
    model = GPT(GPTConfig(**{**TINY, "dropout": 0.1}, attention="triton", layernorm="triton")).to(device)
    idx = torch.randint(0, TINY["vocab_size"], (2, 13), device=device)

    def train_step(idx):
        _, loss = model(idx, idx)
        return loss

    explanation = torch._dynamo.explain(train_step)(idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # The backward of the one compiled graph runs the kernels' backward operators, also without a break.
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(3)
    torch.compile(train_step, fullgraph=True, backend="aot_eager")(idx).backward()
    assert not torch._dynamo.utils.counters["graph_break"]
    compiled_grads = {name: p.grad for name, p in model.named_parameters()}
    # And it computes what the eager model computes, dropout included: the same seed, the same gradients.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    train_step(idx).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
