"""One device for the whole suite, and the numerical rule every kernel test uses.

On a machine with CUDA the tests run there. Without it they run on CPU tensors, and Triton's
interpreter executes the real kernels: TRITON_INTERPRET must be set before triton is imported,
which is why it is set here, at the top of the first file pytest loads.
"""

import itertools
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Low-precision dtypes the device can check. The interpreter computes tl.dot on bf16 operands wrongly,
# so bf16 is checked only on a GPU.
LOW_PRECISION_DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]
DTYPES = [torch.float32, *LOW_PRECISION_DTYPES]

# Triton's interpreter runs a launch's programs one at a time, in grid order: a result that depends on the order
# programs run in (one program reading what another wrote) comes out the same every time there, so running a call
# twice and comparing bits proves nothing off a GPU. On CPU, tests/test_program_order.py shuffles the order instead.
gpu_only_determinism = pytest.mark.skipif(
    DEVICE != "cuda", reason="the interpreter runs programs one at a time in grid order, so two runs agree whatever "
    "the kernel does; on CPU tests/test_program_order.py runs them in shuffled orders")

# The absolute floor added to the error rule, per dtype: a few units in the last place at magnitude 1.
ABSOLUTE_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


@pytest.fixture(params=[DEVICE])
def device(request):
    """The device every test runs on: CUDA when present, else CPU through Triton's interpreter."""
    return request.param


def max_error(actual, reference):
    return (actual.double() - reference.double()).abs().max().item()


def assert_within_error_rule(fused, eager_low_precision, reference64, factor=2.0, floor=None, name="output"):
    """The FlashAttention test rule: the fused result's error against the float64 reference is at most
    `factor` times the error of the eager path run in the same low precision, plus a small absolute floor.

    fused:               the kernel's result, in its own dtype.
    eager_low_precision: the eager reference computed in the same dtype on the same inputs.
    reference64:         the eager reference computed in float64 on the same inputs.
    """
    assert fused.shape == reference64.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(reference64.shape)}"
    assert torch.isfinite(fused).all(), f"{name}: non-finite values (an unwritten or overflowed element)"
    if floor is None:
        floor = ABSOLUTE_FLOOR[fused.dtype]
    fused_err = max_error(fused, reference64)
    eager_err = max_error(eager_low_precision, reference64)
    bound = factor * eager_err + floor
    assert fused_err <= bound, (
        f"{name}: max error {fused_err:.3e} exceeds {factor} x eager error {eager_err:.3e} + floor {floor:.1e}"
    )


def _logits_and_grads(model, idx, targets, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(idx.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits, loss = model(idx, targets)
    loss.backward()
    return logits, grads_by_state_dict_name(model)


def grads_by_state_dict_name(model):
    """Each parameter's gradient under its state-dict name: what state_dict() gives with every parameter's data
    swapped for its gradient. A fused module that packs several eager parameters into one (the fused attention's
    qkv projection) splits its gradient as it splits its weights, so gradients compare name by name with eager."""
    parameters = list(model.parameters())
    weights = [p.data for p in parameters]
    try:
        for p in parameters:
            p.data = p.grad
        return model.state_dict()
    finally:
        for p, weight in zip(parameters, weights):
            p.data = weight


def assert_gpt_within_error_rule(fused, eager, idx, targets, autocast_dtype=None):
    """A GPT with fused backends against the eager GPT holding the same weights, by the error rule: logits and
    every parameter's gradient, with the eager GPT rerun in float64 as the reference. With autocast_dtype,
    the fused and the eager GPT both run under torch.autocast to that dtype (the reference never does), and
    the floor is that dtype's."""
    from gpt.model import GPT

    reference = GPT(eager.config).to(idx.device).double()
    reference.load_state_dict(eager.state_dict())
    fused_logits, fused_grads = _logits_and_grads(fused, idx, targets, autocast_dtype)
    eager_logits, eager_grads = _logits_and_grads(eager, idx, targets, autocast_dtype)
    reference_logits, reference_grads = _logits_and_grads(reference, idx, targets)
    floor = None if autocast_dtype is None else ABSOLUTE_FLOOR[autocast_dtype]
    assert fused_logits.dtype == eager_logits.dtype, "the fused GPT's logits must have the eager GPT's dtype"
    assert_within_error_rule(fused_logits, eager_logits, reference_logits, floor=floor, name="logits")
    assert fused_grads.keys() == reference_grads.keys()
    for name in reference_grads:
        assert_within_error_rule(fused_grads[name], eager_grads[name], reference_grads[name], floor=floor,
                                 name=f"grad {name}")


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every floating tensor made by torch.empty / torch.empty_like during a test starts as NaN,
    so an element a kernel forgets to write shows up as NaN in the comparison instead of as
    whatever the allocator happened to hand back. Kernel test files opt in with
    `pytestmark = pytest.mark.usefixtures("poisoned_allocations")`."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))


@pytest.fixture
def fake_gpu(monkeypatch):
    """Makes torch's device queries answer as on a machine with a CUDA GPU, without one: fake_gpu(bf16=...,
    name=...) sets whether the card has bf16 and its name. Only the queries are stubbed: nothing may run on it."""

    def install(bf16=True, name="NVIDIA H100 80GB HBM3"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return install


@pytest.fixture
def shuffled_programs(monkeypatch):
    """Under Triton's interpreter, every launch runs its programs in a random order instead of grid order: a fresh
    permutation of the grid per launch, drawn from the seed given by calling the fixture's value
    (`shuffled_programs(seed)`; seed None restores grid order). Each program still runs exactly once.

    The interpreter's launcher (triton/runtime/interpreter.py, GridExecutor.__call__) sets the grid's size on its
    builder, then walks the grid in order, setting each program's coordinates before running it: the patch gives
    the n-th program run the coordinates of the n-th entry of the permutation."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx
    order, state = [], {"generator": None}

    def shuffled_grid(nx, ny, nz):
        set_grid_dim(nx, ny, nz)
        order[:] = itertools.product(range(nx), range(ny), range(nz))
        if state["generator"] is not None:
            state["generator"].shuffle(order)

    def coordinates_in_shuffled_order(x, y, z):
        _, ny, nz = builder.grid_dim
        set_grid_idx(*order[(x * ny + y) * nz + z])

    monkeypatch.setattr(builder, "set_grid_dim", shuffled_grid)
    monkeypatch.setattr(builder, "set_grid_idx", coordinates_in_shuffled_order)

    def reseed(seed):
        state["generator"] = None if seed is None else random.Random(seed)

    return reseed


@pytest.fixture
def gpu_tiles(request):
    """Under Triton's interpreter, the test's attention, decoding and dropout-mask launches run at tile shapes the
    tables ship, picked per test from all of them (tests/tile_shapes.py), the mask helper's unlike the kernels'.
    On a GPU the tables' own tiles run. Attention test files opt in with
    `pytestmark = pytest.mark.usefixtures("gpu_tiles")`."""
    if DEVICE == "cuda":
        yield
        return
    from tile_shapes import forced, picked_shapes

    with forced(picked_shapes(request.node.nodeid)):
        yield
