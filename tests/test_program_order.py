"""The kernels' results do not depend on the order their programs run in: gradients (and outputs) bit-identical
under shuffled orders, the property the determinism tests check on a GPU, where programs run concurrently in an
order nobody controls. Under Triton's interpreter programs run one at a time in grid order, so those tests cannot
fail there (they are GPU-only); here every launch runs its programs in grid order and then in shuffled orders (the
`shuffled_programs` fixture), and every result must agree to the bit. A kernel whose programs read what others
wrote (a shared accumulator, say) gives different bits, or different values, under another order."""

import pytest
import torch
import triton
import triton.language as tl
from attention_helpers import make_inputs, values_and_grads
from conftest import DEVICE

from kernels import add_layer_norm, attention

pytestmark = [pytest.mark.skipif(DEVICE == "cuda", reason="shuffles the programs of Triton's interpreter; on a GPU "
                                 "the determinism tests run the real, concurrent programs"),
              pytest.mark.usefixtures("poisoned_allocations")]

ORDERS = [None, 1, 2]  # grid order, then two shuffled orders


def _under_every_order(shuffled_programs, compute):
    """compute() once per order of ORDERS; asserts that every run gives the first's tensors to the bit."""
    results = []
    for seed in ORDERS:
        shuffled_programs(seed)
        results.append(compute())
    for seed, result in zip(ORDERS[1:], results[1:]):
        for index, (first, again) in enumerate(zip(results[0], result)):
            assert torch.equal(first, again), f"result {index} differs under shuffled order {seed}"


@triton.jit
def _record_order_kernel(COUNTER, ORDER):
    """ORDER[pid] = how many programs ran before this one (the counter's value when this program took it)."""
    tl.store(ORDER + tl.program_id(0), tl.atomic_add(COUNTER, 1))


def test_the_interpreter_runs_the_programs_in_the_shuffled_order(shuffled_programs):
    """The fixture's patch takes hold (a Triton whose interpreter no longer sets each program's coordinates through
    its builder would make every test here pass for nothing): grid order first, then a permutation of it."""
    orders = []
    for seed in (None, 1):
        shuffled_programs(seed)
        counter, order = torch.zeros(1, dtype=torch.int32), torch.full((64,), -1, dtype=torch.int32)
        _record_order_kernel[(64,)](counter, order)
        orders.append(order)
    assert torch.equal(orders[0], torch.arange(64, dtype=torch.int32))
    assert sorted(orders[1].tolist()) == list(range(64)) and not torch.equal(orders[1], orders[0])


@pytest.mark.parametrize("heads, kv_heads, n", [(2, 2, 70), (4, 2, 40)], ids=["heads", "grouped"])
def test_attention_backward_is_the_same_in_any_program_order(shuffled_programs, heads, kv_heads, n):
    """Output and the three gradients, over several query and key blocks; with grouped-query heads, each key/value
    head's gradient summed over its group."""
    torch.manual_seed(5)
    inputs = make_inputs(1, heads, n, n, 32, torch.float16, DEVICE, kv_heads=kv_heads)
    grad_out = torch.randn(1, heads, n, 32, device=DEVICE).half()
    _under_every_order(shuffled_programs, lambda: values_and_grads(attention, inputs, grad_out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(200, 384), (12, 5000)], ids=["one-tile-rows", "streamed-rows"])
def test_layer_norm_backward_is_the_same_in_any_program_order(shuffled_programs, dtype, shape):
    """Every program of the backward sums its rows' dweight and dbias into a row of its own, which the launcher
    sums in a fixed order: y, s and every gradient agree to the bit."""
    generator = torch.Generator().manual_seed(4)
    x, residual, dy, ds = (torch.randn(shape, generator=generator).to(DEVICE, dtype) for _ in range(4))
    weight, bias = (torch.randn(shape[-1], generator=generator).to(DEVICE, dtype) for _ in range(2))

    def outputs_and_grads():
        leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
        y, s = add_layer_norm(*leaves)
        torch.autograd.backward((y, s), (dy, ds))
        return [y, s, *(t.grad for t in leaves)]

    _under_every_order(shuffled_programs, outputs_and_grads)
