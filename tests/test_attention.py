"""kernels.attention against the eager attention in float64: values and the three gradients, over sequence
lengths, head sizes, causal and full attention, grouped-query heads, sliding windows, dtypes, strides and
magnitudes; the log-sum-exp; bad input.

On CPU the kernels run through Triton's interpreter at the tile shapes the tables ship, a different pick per test
(the gpu_tiles fixture, tests/tile_shapes.py), so the shapes are small but cover lengths that are not multiples of
a block, several blocks, and the causal diagonal in every position."""

import pytest
import torch
from attention_helpers import check_against_reference, check_log_sum_exp, make_inputs, values_and_grads
from conftest import DEVICE, DTYPES, gpu_only_determinism

import kernels
from kernels import attention, attention_dropout_mask
from kernels.attention import tiles
from kernels.attention.tiles import BackwardTile

pytestmark = pytest.mark.usefixtures("poisoned_allocations", "gpu_tiles")

SEQUENCE_LENGTHS = [(1, 1), (17, 17), (100, 100), (257, 257), (17, 100), (100, 17)]  # (Nq, Nk)
HEAD_SIZES = [8, 16, 20, 32, 48, 64, 80, 96, 128, 256]  # 20: rows of 40 bytes in fp16, not 16-byte aligned


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
def test_head_size_256_band_edges_run_as_whole_blocks(device, dtype):
    """At head size 256 the forward runs the band's edges as whole masked blocks, not diagonal pieces
    (band.forward_edges_in_pieces): a two-sided window over two blocks of queries and several of keys, with dropout,
    where both edges and the blocks between them are visited."""
    torch.manual_seed(256)
    q, k, v = make_inputs(1, 2, 150, 150, 256, dtype, device)
    keep = attention_dropout_mask(q, k, 0.2, seed=5)
    check_against_reference(q, k, v, causal=False, window=(40, 10), keep=keep, dropout_p=0.2, seed=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_size", [200, 256])
def test_dk_and_dv_in_column_slices_of_the_head(device, dtype, head_size):
    """Where one whole-head accumulator does not fit (head size 256 on sm_90), the key programs compute dK and dV
    in column slices of the head, each recomputing P and dP over the whole head (tiles.head_slices): apart and
    together, with grouped-query heads, the causal band and dropout. At head size 200 the last slice is partly
    padding."""
    torch.manual_seed(head_size)
    q, k, v = make_inputs(1, 4, 100, 100, head_size, dtype, device, kv_heads=2)
    keep = attention_dropout_mask(q, k, 0.2, seed=7)
    for tile in (BackwardTile(16, 32, 32, 16, 4, 1, True, 4), BackwardTile(32, 16, 16, 32, 4, 1, False, 2)):
        with tiles.override(tile, kernel="backward"):
            check_against_reference(q, k, v, causal=True, keep=keep, dropout_p=0.2, seed=7)


def test_fp32_backward_at_head_size_256_runs_on_aligned_copies_of_misaligned_operands(device, monkeypatch):
    """Rows of 250 floats (1000 bytes) are not 16 bytes apart: the fp32 backward at head size 256 copies its operands
    into rows that are and launches aligned (tiles.copies_misaligned_operands); the gradients it copies back match
    the reference, with grouped-query heads and dropout."""
    from kernels.attention import ops

    aligned_launches = []
    real_kernel = ops.attention_backward_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(**arguments):
                aligned_launches.append(arguments["ALIGNED"])
                return real_kernel[grid](**arguments)
            return launch

    monkeypatch.setattr(ops, "attention_backward_kernel", Recording())
    torch.manual_seed(250)
    q, k, v = make_inputs(1, 4, 40, 40, 250, torch.float32, device, kv_heads=2)
    keep = attention_dropout_mask(q, k, 0.2, seed=3)
    check_against_reference(q, k, v, causal=True, keep=keep, dropout_p=0.2, seed=3)
    assert aligned_launches and all(aligned_launches)


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


@gpu_only_determinism
def test_backward_is_deterministic(device):
    torch.manual_seed(5)
    inputs = make_inputs(1, 2, 70, 70, 32, DTYPES[-1], device)
    grad_out = torch.randn(1, 2, 70, 32, device=device).to(DTYPES[-1])
    first = values_and_grads(attention, inputs, grad_out)
    second = values_and_grads(attention, inputs, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Grouped-query attention, sliding windows, the log-sum-exp
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kv_heads", [1, 2, 3, 6], ids=lambda h: f"kv{h}")
@pytest.mark.parametrize("causal,n_q,n_k", [(True, 40, 40), (False, 17, 70), (True, 70, 17)])
def test_grouped_query_heads_match_repeated_keys_and_values(device, dtype, kv_heads, causal, n_q, n_k):
    """6 query heads over 1 (multi-query), 2, 3 or 6 key/value heads: query head h reads key/value head
    h // (6 / kv_heads), and dk, dv sum over each group (the reference repeats k and v per group)."""
    torch.manual_seed(20 + kv_heads)
    q, k, v = make_inputs(1, 6, n_q, n_k, 16, dtype, device, kv_heads=kv_heads)
    fused = check_against_reference(q, k, v, causal=causal)
    assert fused[2].shape == k.shape and fused[3].shape == v.shape


@gpu_only_determinism
def test_grouped_query_backward_is_deterministic(device):
    torch.manual_seed(26)
    inputs = make_inputs(1, 4, 40, 40, 32, DTYPES[-1], device, kv_heads=2)
    grad_out = torch.randn(1, 4, 40, 32, device=device).to(DTYPES[-1])
    first = values_and_grads(attention, inputs, grad_out)
    second = values_and_grads(attention, inputs, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


WINDOWS = [(0, 0), (5, 3), (20, -1), (-1, 7), (200, 200), (40, 0)]  # (40, 0): a causal sliding window


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("causal,n_q,n_k", [(True, 80, 80), (False, 80, 80), (False, 33, 90), (True, 90, 33)])
def test_sliding_windows_match_the_masked_reference(device, dtype, window, causal, n_q, n_k):
    """Query i sees keys i + Nk - Nq - left <= j <= i + Nk - Nq + right (the right side at most 0 when causal),
    over several key blocks, so blocks outside the window are skipped and the edges masked; windows wider than
    the sequence and (0, 0) (each query sees one key) included."""
    torch.manual_seed(sum(window) + n_q)
    q, k, v = make_inputs(1, 2, n_q, n_k, 16, dtype, device, kv_heads=1)
    check_against_reference(q, k, v, causal=causal, window=window)


def test_windowed_rows_that_see_no_key_output_zero(device):
    """A window right of 0 with Nq > Nk, or a left window that ends before any key: the empty rows are 0."""
    torch.manual_seed(27)
    q, k, v = make_inputs(1, 1, 50, 20, 16, torch.float32, device)
    out = attention(q, k, v, causal=False, window=(0, 0))  # query i sees key i - 30 only: the first 30 see none
    assert torch.equal(out[:, :, :30], torch.zeros_like(out[:, :, :30])) and (out[:, :, 30:] != 0).any()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_log_sum_exp_is_the_natural_log_of_each_rows_softmax_denominator(device, causal):
    """return_lse: (B, H, Nq) fp32, log(sum_j exp(scale q.k_j)) over the keys a row sees, -inf for a row that sees
    none (causal with Nq > Nk), and out unchanged."""
    torch.manual_seed(28)
    q, k, v = make_inputs(2, 2, 40, 25, 16, torch.float16, device)
    out, lse = attention(q, k, v, causal=causal, scale=0.3, return_lse=True)
    assert lse.shape == (2, 2, 40) and lse.dtype == torch.float32 and not lse.requires_grad
    assert torch.equal(out, attention(q, k, v, causal=causal, scale=0.3))
    scores = (q.double() @ k.double().transpose(-2, -1)) * 0.3
    if causal:
        scores = scores.masked_fill(torch.ones(40, 25, dtype=torch.bool, device=device).tril(-15).logical_not(),
                                    float("-inf"))
    expected = torch.logsumexp(scores, dim=-1)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(lse[finite].double(), expected[finite], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(device):
    q, k, v = (torch.randn(1, 2, 8, 16, device=device) for _ in range(3))
    cases = [
        (ValueError, "4 dimensions", lambda: attention(q[0], k[0], v[0])),
        (ValueError, "4 dimensions", lambda: attention(q, k, v[None])),
        (ValueError, "batch", lambda: attention(q, *(torch.randn(2, 2, 8, 16, device=device),) * 2)),
        (ValueError, "multiple of the key/value heads", lambda: attention(
            torch.randn(1, 3, 8, 16, device=device), k, v)),
        (ValueError, "same shape", lambda: attention(q, k, torch.randn(1, 1, 8, 16, device=device))),
        (ValueError, "same shape", lambda: attention(q, k, torch.randn(1, 2, 9, 16, device=device))),
        (ValueError, "head size", lambda: attention(q, *(torch.randn(1, 2, 8, 32, device=device),) * 2)),
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
        (TypeError, "scale must be a real number", lambda: attention(q, k, v, scale=True)),
        (TypeError, "causal must be a bool", lambda: attention(q, k, v, causal=None)),
        (TypeError, "causal must be a bool", lambda: attention(q, k, v, causal=1)),
        (ValueError, "window", lambda: attention(q, k, v, window=(-2, 0))),
        (TypeError, "window", lambda: attention(q, k, v, window=3)),
        (TypeError, "window", lambda: attention(q, k, v, window=(1.5, 2))),
        (ValueError, "seed", lambda: attention(q, k, v, dropout_p=0.1, seed=-1)),
        (ValueError, "seed", lambda: attention(q, k, v, dropout_p=0.1, seed=2**31)),
        (TypeError, "return_lse", lambda: attention(q, k, v, return_lse=1)),
        (ValueError, "dropout_p", lambda: attention_dropout_mask(q, k, 1.5)),
    ]
    for error, words, call in cases:
        with pytest.raises(error, match=words):
            call()


def test_sdpas_positional_order_is_an_error_not_a_silent_misreading(device):
    """SDPA's order is (q, k, v, attn_mask, dropout_p, is_causal): passed positionally here it would read None as
    causal and a bool as a scale. Every option after v is keyword-only."""
    q, k, v = (torch.randn(1, 2, 8, 16, device=device) for _ in range(3))
    with pytest.raises(TypeError, match="positional"):
        attention(q, k, v, None, 0.0, True)
    with pytest.raises(TypeError, match="positional"):
        attention(q, k, v, True)


def test_public_api():
    from kernels.attention import api, dropout_mask

    assert kernels.attention is attention and kernels.attention_dropout_mask is attention_dropout_mask
    assert kernels.attention_varlen is api.attention_varlen
    assert kernels.attention_varlen_dropout_mask is dropout_mask.attention_varlen_dropout_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_log_sum_exp_in_every_dtype_matches_float64(device, dtype, causal):
    """return_lse of fp32, fp16 and bf16 inputs (under the interpreter, bf16 takes the fp32 kernels) against
    the float64 log-sum-exp by the error rule, grouped-query heads, Nk = 45 off the block, Nq = 70 > Nk (causal:
    the first 25 rows see no key)."""
    torch.manual_seed(29)
    q, k, v = make_inputs(2, 4, 70, 45, 16, dtype, device, kv_heads=2)
    with torch.no_grad():
        out, lse = attention(q, k, v, causal=causal, scale=0.3, return_lse=True)
        assert torch.equal(out, attention(q, k, v, causal=causal, scale=0.3))
    check_log_sum_exp(lse, q, k, 0.3, causal)
