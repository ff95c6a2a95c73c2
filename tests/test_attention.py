"""kernels.attention against the eager attention in float64: values and the three gradients, over sequence
lengths, head sizes, causal and full attention, dtypes, strides and magnitudes; dropout; bad input.

On CPU the kernels run through Triton's interpreter with 32 x 32 blocks, so the shapes are small but cover
lengths that are not multiples of a block, several blocks, and the causal diagonal in every position."""

import itertools
import math

import pytest
import torch
from conftest import ABSOLUTE_FLOOR, DTYPES, assert_within_error_rule

import kernels
from kernels import attention, attention_dropout_mask
from kernels.reference import attention_reference

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

SEQUENCE_LENGTHS = [(1, 1), (17, 17), (100, 100), (257, 257), (17, 100), (100, 17)]  # (Nq, Nk)
HEAD_SIZES = [8, 16, 20, 32, 48, 64, 80, 96, 128, 256]  # 20: rows of 40 bytes in fp16, not 16-byte aligned


def make_inputs(B, H, n_q, n_k, D, dtype, device, magnitude=1.0):
    q = torch.randn(B, H, n_q, D, device=device) * magnitude
    k = torch.randn(B, H, n_k, D, device=device) * magnitude
    v = torch.randn(B, H, n_k, D, device=device)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def values_and_grads(fn, inputs, grad_out):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    return [out, *grads]


def check_against_reference(q, k, v, grad_out=None, causal=True, scale=None, keep=None, dropout_p=0.0,
                            floor_scale=1.0, **attention_kwargs):
    """Fused (out, dq, dk, dv) vs the float64 eager reference, by the error rule against eager run in the
    inputs' dtype; `floor_scale` multiplies the rule's absolute floor (for inputs far from magnitude 1)."""
    dtype = q.dtype
    if grad_out is None:
        grad_out = torch.randn(q.shape, device=q.device, dtype=dtype)
    fused = values_and_grads(
        lambda q, k, v: attention(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p, **attention_kwargs),
        (q, k, v), grad_out)

    def eager(*inputs):
        return attention_reference(*inputs, causal=causal, scale=scale, keep=keep, dropout_p=dropout_p)

    reference = values_and_grads(eager, [t.double() for t in (q, k, v)], grad_out.double())
    low = values_and_grads(eager, (q, k, v), grad_out)
    for name, f, e, r in zip(("out", "dq", "dk", "dv"), fused, low, reference):
        assert f.dtype == dtype, f"{name} has dtype {f.dtype}"
        assert_within_error_rule(f, e, r, floor=ABSOLUTE_FLOOR[dtype] * floor_scale, name=name)
    return fused


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("n_q,n_k", SEQUENCE_LENGTHS, ids=lambda n: str(n))
def test_matches_reference_over_sequence_lengths(device, dtype, causal, n_q, n_k):
    torch.manual_seed(n_q * 1000 + n_k)
    B, H = (2, 1) if n_q * n_k > 10_000 else (1, 2)
    check_against_reference(*make_inputs(B, H, n_q, n_k, 32, dtype, device), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_matches_reference_over_head_sizes(device, dtype, head_size):
    torch.manual_seed(head_size)
    check_against_reference(*make_inputs(1, 2, 40, 40, head_size, dtype, device), causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_custom_scale(device, dtype):
    torch.manual_seed(1)
    check_against_reference(*make_inputs(2, 1, 50, 50, 32, dtype, device), causal=True, scale=0.3)


# Probabilities of masked or padded positions may overflow before tl.where discards them; the interpreter's
# numpy says so, the GPU does not.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_magnitude_inputs_stay_finite_and_accurate(device, dtype):
    """Scores of thousands: a softmax without the running max would overflow. Eager fp16 math itself overflows
    (q.k > 65504) beyond about x30, so fp16 uses x30 and fp32 x100.

    q and k hold integers: every product and partial sum of q.k is then an integer below 2^24, exact in fp32 in
    any summation order, so the backward's recomputed scores equal the forward's bit for bit. With real-valued
    inputs they would not: at scores of ~4e4 one fp32 ulp is ~4e-3, and the forward and the backward sum q.k in
    different orders (other tiles; under the interpreter, whatever order the machine's BLAS picks), which moves
    the recomputed P by ~1e-3 relative where eager's, computed once, is exact: a machine-dependent error no
    kernel bug is needed for. The softmax saturates, so eager's dS = P (dP - rowsum(P dP)) is exactly 0 where the
    kernel's uses delta = rowsum(dO O), equal only up to rounding at |dO||V|; dQ, dK multiply that by |K|, |Q|
    ~ magnitude, hence the floor's factor."""
    torch.manual_seed(2)
    magnitude = 100 if dtype == torch.float32 else 30
    q, k = (torch.randint(-magnitude, magnitude + 1, (1, 2, 70, 16), device=device).to(dtype).requires_grad_()
            for _ in range(2))
    v = torch.randn(1, 2, 70, 16, device=device).to(dtype).requires_grad_()
    fused = check_against_reference(q, k, v, causal=True, floor_scale=magnitude)
    assert all(torch.isfinite(t).all() for t in fused)


def test_bf16_is_computed_right_on_every_device(device):
    """bf16 by the error rule wherever the kernels run: on a GPU the bf16 kernels, under the interpreter (whose bf16
    products are wrong) the fp32 kernels rounded to bf16. Dropout included, so its mask and seed survive the
    detour."""
    torch.manual_seed(5)
    q, k, v = make_inputs(2, 2, 40, 40, 32, torch.bfloat16, device)
    check_against_reference(q, k, v, causal=True)
    keep = attention_dropout_mask(q, k, 0.3, seed=7)
    check_against_reference(q, k, v, causal=True, keep=keep, dropout_p=0.3, seed=7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs_sliced_from_one_projection(device, dtype):
    """q, k, v as the fused module makes them: views into one (B, T, 3, H, D) projection, transposed to
    (B, H, T, D); and a grad_out that is itself a transposed view. No copy is needed, none is made."""
    torch.manual_seed(3)
    B, T, H, D = 2, 45, 2, 24
    qkv = torch.randn(B, T, 3, H, D, device=device).to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous() and q.stride(-2) == 3 * H * D
    grad_out = torch.randn(B, T, H, D, device=device, dtype=dtype).transpose(1, 2)
    check_against_reference(q, k, v, grad_out=grad_out, causal=True)
    # a head-size stride other than 1 works too
    wide = torch.randn(1, 2, 30, 2 * D, device=device).to(dtype)
    check_against_reference(wide[..., ::2], wide[..., 1::2], wide[..., ::2].flip(-2), causal=False)


def test_output_layout_merges_heads_without_a_copy(device):
    q, k, v = make_inputs(2, 3, 20, 20, 16, torch.float32, device)
    out = attention(q, k, v)
    merged = out.transpose(1, 2).reshape(2, 20, 48)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None


def test_queries_that_see_no_key_output_zero_with_zero_gradients(device):
    # causal with Nq > Nk: query i sees keys j <= i - (Nq - Nk), so the first Nq - Nk queries see none
    torch.manual_seed(4)
    q, k, v = make_inputs(1, 2, 40, 9, 16, torch.float32, device)
    out = attention(q, k, v, causal=True)
    out.backward(torch.randn_like(out))
    assert torch.equal(out[:, :, :31], torch.zeros_like(out[:, :, :31]))
    assert torch.equal(q.grad[:, :, :31], torch.zeros_like(q.grad[:, :, :31]))
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_backward_is_deterministic(device):
    torch.manual_seed(5)
    inputs = make_inputs(1, 2, 70, 70, 32, DTYPES[-1], device)
    grad_out = torch.randn(1, 2, 70, 32, device=device).to(DTYPES[-1])
    first = values_and_grads(attention, inputs, grad_out)
    second = values_and_grads(attention, inputs, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------


def test_dropout_same_seed_same_output_different_seed_different_output(device):
    q, k, v = make_inputs(2, 2, 33, 33, 16, torch.float32, device)
    torch.manual_seed(10)
    first = attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(10)
    again = attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(11)
    other = attention(q, k, v, dropout_p=0.3)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(attention(q, k, v, dropout_p=0.3, seed=7), attention(q, k, v, dropout_p=0.3, seed=7))


def test_dropout_mask_is_fresh_per_head_and_keeps_the_right_fraction(device):
    q = torch.randn(2, 3, 64, 16, device=device)
    keep = attention_dropout_mask(q, q, 0.25, seed=123)
    assert keep.shape == (2, 3, 64, 64) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.75) < 0.02  # 24576 draws: 5 standard errors
    flat = keep.flatten(0, 1)
    assert all(not torch.equal(flat[0], flat[i]) for i in range(1, 6))
    assert torch.equal(attention_dropout_mask(q, q, 0.0, seed=123), torch.ones_like(keep))


def test_no_dropout_draws_no_random_number(device):
    q, k, v = make_inputs(1, 1, 8, 8, 16, torch.float32, device)
    torch.manual_seed(0)
    attention(q, k, v, dropout_p=0.0)
    after_call = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after_call, torch.rand(1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal,n_q,n_k,head_size", [
    (True, 70, 70, 32), (False, 30, 75, 32), (True, 75, 30, 32),
    (True, 40, 40, 200),  # head size 256 class: dK and dV in separate launches, each regenerating the mask
])
def test_dropout_matches_eager_with_the_helpers_mask_values_and_gradients(device, dtype, causal, n_q, n_k,
                                                                          head_size):
    """The seeded forward and its backward equal the eager path that applies the helper's mask."""
    torch.manual_seed(12)
    q, k, v = make_inputs(1, 2, n_q, n_k, head_size, dtype, device)
    grad_out = torch.randn(q.shape, device=device).to(dtype)
    torch.manual_seed(99)
    keep = attention_dropout_mask(q, k, 0.2)
    assert not keep.all()
    torch.manual_seed(99)  # the attention call inside draws the same seed as the helper did
    check_against_reference(q, k, v, grad_out=grad_out, causal=causal, keep=keep, dropout_p=0.2)


def test_dropout_mean_over_seeds_approaches_no_dropout_output(device):
    torch.manual_seed(13)
    q, k, v = (t.detach() for t in make_inputs(1, 1, 16, 16, 16, torch.float32, device))
    expected = attention(q, k, v)
    samples = torch.stack([attention(q, k, v, dropout_p=0.5, seed=seed) for seed in range(100)])
    standard_error = samples.std(0) / math.sqrt(len(samples))
    assert ((samples.mean(0) - expected).abs() <= 5 * standard_error + 1e-6).all()


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(device):
    q, k, v = (torch.randn(1, 2, 8, 16, device=device) for _ in range(3))
    cases = [
        (ValueError, "4 dimensions", lambda: attention(q[0], k[0], v[0])),
        (ValueError, "4 dimensions", lambda: attention(q, k, v[None])),
        (ValueError, "batch and heads", lambda: attention(q, torch.randn(2, 2, 8, 16, device=device), v)),
        (ValueError, "batch and heads", lambda: attention(q, k, torch.randn(1, 3, 8, 16, device=device))),
        (ValueError, "head size", lambda: attention(q, torch.randn(1, 2, 8, 32, device=device), v)),
        (ValueError, "same sequence length", lambda: attention(q, k, torch.randn(1, 2, 9, 16, device=device))),
        (TypeError, "dtype", lambda: attention(q, k.half(), v)),
        (TypeError, "dtype", lambda: attention(q.double(), k.double(), v.double())),
        (TypeError, "dtype", lambda: attention(q.int(), k.int(), v.int())),
        (TypeError, "torch.Tensor", lambda: attention(q, k.tolist(), v)),
        (ValueError, "is on", lambda: attention(q, k.to("meta"), v)),
        (ValueError, "head size 257", lambda: attention(*(torch.randn(1, 1, 4, 257, device=device),) * 3)),
        (ValueError, "empty", lambda: attention(q[:, :, :0], k, v)),
        (ValueError, "dropout_p", lambda: attention(q, k, v, dropout_p=1.0)),
        (ValueError, "dropout_p", lambda: attention(q, k, v, dropout_p=-0.1)),
        (ValueError, "scale", lambda: attention(q, k, v, scale=0.0)),
        (ValueError, "scale", lambda: attention(q, k, v, scale=float("nan"))),
        (ValueError, "scale", lambda: attention(q, k, v, scale=float("inf"))),
        (ValueError, "seed", lambda: attention(q, k, v, dropout_p=0.1, seed=-1)),
        (ValueError, "dropout_p", lambda: attention_dropout_mask(q, k, 1.5)),
    ]
    for error, words, call in cases:
        with pytest.raises(error, match=words):
            call()


def test_public_api():
    assert kernels.attention is attention and kernels.attention_dropout_mask is attention_dropout_mask


# ---------------------------------------------------------------------------------------------------------
# Launch configurations (bench/compile_report.py compiles them; here only their bookkeeping)
# ---------------------------------------------------------------------------------------------------------


def test_every_launch_the_table_can_make_is_compiled_by_the_report():
    """Every tile the launch tables can give, for every head size, dtype, dropout, checked arch and alignment, is
    among the configs the compile report compiles (which are checked for spills in test_compile_report)."""
    from bench import compile_report
    from kernels._gpu import CHECKED_ARCHS
    from kernels.attention import tiles

    entries = compile_report.attention_configs()
    assert len({e["name"] for e in entries}) == len(entries)
    shipped = set()
    for e in entries:
        assert set(e["signature"]) == set(e["kernel"].arg_names), e["name"]
        assert all(e["signature"][name] == "constexpr" for name in e["constexprs"]), e["name"]
        c = e["constexprs"]
        pointer = e["signature"][e["kernel"].arg_names[0]]  # the dtype of the first tensor argument
        for arch, aligned in e["targets"]:
            assert c["ALIGNED"] == aligned, e["name"]
            shipped.add((e["kernel"], pointer, c["BLOCK_D"], c.get("BLOCK_M"), c.get("BLOCK_N"), c.get("DROPOUT"),
                         c.get("COMPUTE_DK"), c.get("COMPUTE_DV"), e["num_warps"], e["num_stages"], arch, aligned))
    kernel_of = {e["name"].split("_causal")[0].removeprefix("attention_"): e["kernel"] for e in entries}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in range(1, tiles.MAX_HEAD_SIZE + 1):
            block_d = tiles.block_d(head_dim)
            for name in ("forward", *tiles.key_block_passes(block_d), "dq"):
                compute_dk, compute_dv = tiles.COMPUTED_GRADIENTS.get(name, (None, None))
                for dropout, arch, aligned in itertools.product((False, True), CHECKED_ARCHS, (True, False)):
                    tile = tiles.table_tile(name, head_dim, dtype, dropout, arch, aligned)
                    key = (kernel_of[name], compile_report.POINTER_TYPES[str(dtype).removeprefix("torch.")],
                           block_d, tile.block_m, tile.block_n, dropout, compute_dk, compute_dv, tile.num_warps,
                           tile.num_stages, arch, aligned)
                    assert key in shipped, (f"{name} {dtype} D={head_dim} dropout={dropout} sm_{arch} "
                                            f"aligned={aligned} is not compiled by the report")


def test_operand_alignment_means_16_byte_rows(device):
    from kernels.attention.shared import operands_aligned

    x = torch.randn(2, 3, 40, 64, device=device)
    assert operands_aligned(x, x.transpose(1, 2))
    assert operands_aligned(torch.randn(2, 3, 40, 40, device=device, dtype=torch.float16))  # rows of 80 bytes
    assert not operands_aligned(torch.randn(2, 3, 40, 36, device=device, dtype=torch.float16))  # rows of 72
    shifted = torch.randn(x.numel() + 1, device=device)[1:].view(x.shape)
    assert shifted.stride() == x.stride() and not operands_aligned(shifted)  # a pointer 4 bytes past alignment
    assert not operands_aligned(x.transpose(2, 3))  # a last dimension that is not contiguous


def test_launch_config_picks_the_tile_for_the_gpu_and_the_operands(monkeypatch):
    """The launcher's choice on a (pretend) H100 and A100: the table's tile for the arch and alignment, the sm_90
    wgmma tile at head size 256 only for aligned operands."""
    from kernels.attention import tiles

    for capability, arch in (((9, 0), 90), ((8, 0), 80)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, capability=capability: capability)
        for aligned in (True, False):
            expected = tiles.table_tile("forward", 256, torch.bfloat16, False, arch, aligned)
            assert tiles.launch_tile("forward", 256, torch.bfloat16, False, torch.device("cuda"), aligned) == expected
    assert tiles.table_tile("forward", 256, torch.bfloat16, False, 90, True) != \
        tiles.table_tile("forward", 256, torch.bfloat16, False, 90, False)
