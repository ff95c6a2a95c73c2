"""The attention kernels at every tile shape the tables ship, and what depends on the tile: each shipped shape of
the forward, the backward launch (its dK/dV and its dQ programs), decoding and the dropout-mask helper runs on CPU
at least once here (the other test files run them all in rotation, tests/tile_shapes.py); the backward's program
split; the loads without bounds masks when the lengths divide the blocks; the diagonal computed in pieces."""

import pytest
import torch
from attention_helpers import check_against_reference, make_inputs
from tile_shapes import forced, rotation, shipped_shapes
from test_decode import _check as check_decoding

from kernels import attention, attention_dropout_mask
from kernels.attention import ops as attention_ops
from kernels.decode import ops as decode_ops

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

SHAPES = [(launch, tile) for launch, tiles in rotation().items() for tile in tiles]
SHAPE_IDS = [f"{launch}-{'-'.join(map(str, tile))}" for launch, tile in SHAPES]
# The block constexprs each launch's tile sets, by the tile's fields.
BLOCK_ARGUMENTS = {
    "forward": ("attention_forward_kernel", {"BLOCK_M": "block_m", "BLOCK_N": "block_n"}),
    "backward": ("attention_backward_kernel", {"BLOCK_M1": "block_m1", "BLOCK_N1": "block_n1", "BLOCK_M2": "block_m2",
                                               "BLOCK_N2": "block_n2", "DK_DV_APART": "dk_dv_apart",
                                               "HEAD_SLICES": "head_slices"}),
    "decode": ("decode_split_kernel", {"BLOCK_R": "block_m", "BLOCK_N": "block_n"}),
    "dropout_mask": ("dropout_mask_kernel", {"BLOCK_M": "block_m", "BLOCK_N": "block_n"}),
}


class _Recorded:
    """A kernel that records each launch's grid and keyword arguments, then launches."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.launches.append((self.kernel.__name__, grid, kwargs))
            return self.kernel[grid](**kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    """[(kernel name, grid, keyword arguments)] of every attention, decoding and dropout-mask launch of the test."""
    found = []
    for module, names in ((attention_ops, ("attention_forward_kernel", "attention_backward_kernel",
                                           "dropout_mask_kernel")), (decode_ops, ("decode_split_kernel",))):
        for name in names:
            monkeypatch.setattr(module, name, _Recorded(getattr(module, name), found))
    return found


def _run_attention(device):
    """Causal attention with dropout and grouped-query heads, then a two-sided window: 150 rows (blocks of up to 128
    and a partial one), values and gradients against the float64 reference, the dropout through the helper's
    mask. The window, 111 keys wide, holds whole blocks of 64 keys or queries beside its edges, so its unmasked
    ranges are not empty at the shapes whose rounding matters (BLOCK_M against BLOCK_N)."""
    torch.manual_seed(20)
    q, k, v = make_inputs(1, 4, 150, 150, 64, torch.float32, device, kv_heads=2)
    keep = attention_dropout_mask(q, k, 0.2, seed=3)
    check_against_reference(q, k, v, causal=True, keep=keep, dropout_p=0.2, seed=3)
    check_against_reference(q, k, v, causal=False, window=(90, 20))


@pytest.mark.parametrize("launch, tile", SHAPES, ids=SHAPE_IDS)
def test_every_shipped_tile_shape_computes_the_reference_on_cpu(device, launches, launch, tile):
    """Each shape the tables ship (and tile_shapes.UNSHIPPED_SHAPES), forced on its launch (the others run the
    tables' own tiles): the launch ran at it, and the results match the reference. A tile a later change adds is run
    here too."""
    with forced({launch: tile}):
        if launch == "decode":
            check_decoding([0, 1, 37, 70], 4, 2, 2, torch.float32, device, True, 2, head_dim=32, n_max=80)
        else:
            _run_attention(device)
    name, fields = BLOCK_ARGUMENTS[launch]
    ran = [kwargs for kernel, _, kwargs in launches if kernel == name]
    assert ran, f"{name} never launched"
    if device == "cpu":  # on a GPU the override is still honoured, but these shapes need not fit every dtype
        assert all(kwargs[argument] == getattr(tile, field) for kwargs in ran for argument, field in fields.items())


def test_the_backward_launch_is_key_programs_then_query_programs(device, launches):
    """One launch for dK, dV and dQ: cdiv(Nk, block_n1) * B * H_KV key programs (twice that with dK and dV apart,
    times the head's column slices), then cdiv(Nq, block_m2) * B * H query programs."""
    torch.manual_seed(21)
    q, k, v = make_inputs(2, 6, 70, 50, 64, torch.float32, device, kv_heads=2)
    for tile in shipped_shapes()["backward"]:
        launches.clear()
        with forced({"backward": tile}):
            attention(q, k, v, causal=True).sum().backward()
        (grid,) = [grid for kernel, grid, _ in launches if kernel == "attention_backward_kernel"]
        key_programs = -(-50 // tile.block_n1) * 2 * 2 * (2 if tile.dk_dv_apart else 1) * tile.head_slices
        assert grid == (key_programs + -(-70 // tile.block_m2) * 2 * 6,), tile


@pytest.mark.parametrize("n_q, n_k", [(256, 256), (256, 200), (200, 256)])
def test_whole_blocks_load_without_bounds_masks_and_partial_blocks_with_them(device, launches, n_q, n_k):
    """EVEN (no bounds masks on the loads of the blocks seen whole) exactly when both lengths are multiples of every
    block of the tile: 256 is, 200 is not (of the 128-row blocks the sm_90 16-bit tiles have at head size 64)."""
    torch.manual_seed(22)
    q, k, v = make_inputs(1, 2, n_q, n_k, 64, torch.float16, device)
    check_against_reference(q, k, v, causal=True)
    even = [kwargs["EVEN"] for kernel, _, kwargs in launches
            if kernel in ("attention_forward_kernel", "attention_backward_kernel")]
    assert even == [n_q == n_k == 256] * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="bench.workcount counts the kernels under the interpreter")
def test_the_diagonal_is_computed_in_pieces():
    """At the reference GPT's context (causal, N = 256, head size 64, sm_90 tiles), the products per visible
    (query, key) pair: whole 128-row diagonal blocks would cost 2.5 forward and 10.5 backward; the 16-row pieces
    keep them near the minimum of 2 and 7 (the goals: 2.2 and 7.6)."""
    from bench import workcount

    forward, backward = workcount.run_attention(workcount.AttentionCase(batch=1, heads=1, n=256, head_dim=64))
    assert forward.products() <= 2.2 and backward.products() <= 7.6
