"""kernels.decode_attention against the float64 eager reference, sequence by sequence: ragged cache lengths (0, 1,
17, a block boundary, the whole cache), with and without appending new keys and values (and the caches after the
append: the new rows in place, nothing else touched), one and several new tokens, grouped-query ratios 1, 2, 3
and 6, the keys in one split and in several; head sizes, a 128k-slot cache, the split count the launcher picks;
lengths out of range where they cannot be checked; the operator under opcheck and torch.compile; bad input.

On CPU the kernels run through Triton's interpreter, whose cost is per program: batches of a few sequences and
one or two key/value heads."""

import pytest
import torch
import triton
from conftest import ABSOLUTE_FLOOR, DTYPES, assert_within_error_rule

import kernels
from kernels import decode_attention
from kernels.decode import ops, tiles
from kernels.reference import attention_reference

pytestmark = pytest.mark.usefixtures("poisoned_allocations", "gpu_tiles")

HEAD_DIM = 16
# (query heads, key/value heads) of each grouped-query ratio: two key/value heads where the group is small, so a
# second group's keys are read too; a group of 6 with 3 new tokens is 18 rows, two blocks of 16 rows.
HEADS_OF_GROUP = {1: (2, 2), 2: (4, 2), 3: (3, 1), 6: (6, 1)}


def _decode_attention(q, k_cache, v_cache, cache_seqlens, *, k_new, v_new, scale, num_splits):
    """decode_attention with the number of chunks each sequence's keys are cut into forced (None: the launcher's
    choice): its operator, on inputs the public function passes on unchanged."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return ops.decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, num_splits or 0)


def _block_n(dtype, head_dim=HEAD_DIM):
    return tiles.decode_tile(head_dim, dtype).block_n


def _ragged_lengths(n_max, n_new, block_n):
    """cache_seqlens before the append: empty, one key, just past a block, exactly one block, and full (the whole
    cache once the n_new new keys are in)."""
    return [0, 1, 17, block_n, n_max - n_new]


def _inputs(lengths, heads, kv_heads, n_q, head_dim, n_max, dtype, device, append):
    """q, the caches (random everywhere, also past each length), cache_seqlens, and k_new, v_new or None."""
    batch = len(lengths)
    q = torch.randn(batch, heads, n_q, head_dim, device=device).to(dtype)
    k_cache, v_cache = (torch.randn(batch, kv_heads, n_max, head_dim, device=device).to(dtype) for _ in range(2))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    new = [torch.randn(batch, kv_heads, n_q, head_dim, device=device).to(dtype) for _ in range(2)] if append \
        else [None, None]
    return q, k_cache, v_cache, seqlens, *new


def _reference(q, k_cache, v_cache, lengths, dtype, scale=None):
    """The eager attention of each sequence alone against its first L keys, in `dtype`: causal bottom-right."""
    outs = [attention_reference(q[b:b + 1].to(dtype), k_cache[b:b + 1, :, :n].to(dtype),
                                v_cache[b:b + 1, :, :n].to(dtype), causal=True, scale=scale)
            for b, n in enumerate(lengths)]
    return torch.cat(outs)


def _check(lengths, heads, kv_heads, n_q, dtype, device, append, num_splits, head_dim=HEAD_DIM, n_max=None,
           scale=None):
    """One decode_attention call against the reference by the error rule, and the caches after it: the new rows
    at [length, length + Nq), every other slot untouched."""
    n_max = n_max or max(lengths) + (n_q if append else 0)
    q, k_cache, v_cache, seqlens, k_new, v_new = _inputs(lengths, heads, kv_heads, n_q, head_dim, n_max, dtype,
                                                         device, append)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    if append:
        for b, n in enumerate(lengths):
            expected_k[b, :, n:n + n_q], expected_v[b, :, n:n + n_q] = k_new[b], v_new[b]
    out = _decode_attention(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, scale=scale,
                            num_splits=num_splits)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v), "the caches after the call"
    assert out.dtype == dtype and out.shape == q.shape
    assert out.transpose(1, 2).is_contiguous(), "heads side by side, so merging them is free"
    final = [n + (n_q if append else 0) for n in lengths]
    reference = _reference(q, expected_k, expected_v, final, torch.float64, scale)
    eager = _reference(q, expected_k, expected_v, final, dtype, scale)
    assert_within_error_rule(out, eager, reference, floor=ABSOLUTE_FLOOR[dtype])
    return out


@pytest.mark.parametrize("num_splits", [1, 3], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("append", [True, False], ids=["append", "cached"])
@pytest.mark.parametrize("n_q", [1, 3], ids=lambda n: f"nq{n}")
@pytest.mark.parametrize("group", list(HEADS_OF_GROUP), ids=lambda g: f"group{g}")
def test_matches_reference_on_ragged_lengths(device, group, n_q, append, num_splits):
    torch.manual_seed(group * 100 + n_q * 10 + append)
    heads, kv_heads = HEADS_OF_GROUP[group]
    n_max = 2 * _block_n(torch.float32) + 8  # not a whole number of blocks
    lengths = _ragged_lengths(n_max, n_q if append else 0, _block_n(torch.float32))
    _check(lengths, heads, kv_heads, n_q, torch.float32, device, append, num_splits, n_max=n_max)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [1, 4], ids=lambda s: f"splits{s}")
def test_dtypes_and_a_custom_scale(device, dtype, num_splits):
    torch.manual_seed(7)
    n_max = 2 * _block_n(dtype) + 8
    lengths = _ragged_lengths(n_max, 2, _block_n(dtype))
    _check(lengths, 4, 2, 2, dtype, device, True, num_splits, n_max=n_max, scale=0.3)


def test_bf16_is_computed_right_on_every_device(device):
    """On a GPU the bf16 kernels; under the interpreter (whose bf16 products are wrong) the fp32 kernels on copies,
    the output rounded to bf16 and the appended rows written back into the bf16 caches."""
    torch.manual_seed(8)
    _check([5, 0, 20], 2, 1, 2, torch.bfloat16, device, True, 2)


@pytest.mark.parametrize("head_dim", [20, 256], ids=lambda d: f"d{d}")
def test_head_sizes(device, head_dim):
    """20: padded to 32 and, in fp16, rows of 40 bytes (not 16-byte aligned); 256: the largest."""
    torch.manual_seed(head_dim)
    _check([3, 18], 2, 1, 2, torch.float16, device, True, 2, head_dim=head_dim)


def test_a_128k_cache_and_the_launchers_split_count(device):
    """Nmax = 2**17 slots, the split count left to the launcher (several, from the batch and Nmax). The
    interpreter reads a few hundred keys of it; a GPU reads a whole sequence."""
    torch.manual_seed(9)
    n_max = 2**17
    longest = n_max - 4 if device == "cuda" else 300
    assert tiles.launch_splits(2, n_max, torch.device(device)) > 1
    _check([5, longest], 2, 1, 4, torch.float16, device, True, None, n_max=n_max)


def test_public_function_appends_and_attends(device):
    torch.manual_seed(10)
    q, k_cache, v_cache, seqlens, k_new, v_new = _inputs([4, 9], 4, 2, 1, HEAD_DIM, 12, torch.float32, device, True)
    out = kernels.decode_attention(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new)
    reference = _reference(q, k_cache, v_cache, [5, 10], torch.float64)
    assert_within_error_rule(out, _reference(q, k_cache, v_cache, [5, 10], torch.float32), reference)
    assert torch.equal(k_cache[1, :, 9], k_new[1, :, 0]) and torch.equal(v_cache[0, :, 4], v_new[0, :, 0])


def test_one_length_for_the_whole_batch_is_an_int(device):
    """cache_seqlens as one int, as generation with equal lengths has it: the same result as the tensor, checked
    on the host (a tensor's lengths cost a device synchronisation to check), range included."""
    torch.manual_seed(11)
    q, k_cache, v_cache, _, k_new, v_new = _inputs([6, 6], 4, 2, 1, HEAD_DIM, 12, torch.float32, device, True)
    k_copy, v_copy = k_cache.clone(), v_cache.clone()
    out = kernels.decode_attention(q, k_cache, v_cache, 6, k_new=k_new, v_new=v_new)
    as_tensor = kernels.decode_attention(q, k_copy, v_copy, torch.tensor([6, 6], dtype=torch.int32, device=device),
                                         k_new=k_new, v_new=v_new)
    assert torch.equal(out, as_tensor) and torch.equal(k_cache, k_copy)
    with pytest.raises(ValueError, match=r"must lie in \[0, 11\] for caches of 12 slots, got 12"):
        kernels.decode_attention(q, k_cache, v_cache, 12, k_new=k_new, v_new=v_new)


def test_launches_run_on_the_inputs_device(device, monkeypatch):
    """Triton launches on the current device: the decoding launches make q's device current first."""
    entered = []
    real_launch_device = ops.launch_device
    monkeypatch.setattr(ops, "launch_device", lambda t: entered.append(t.device) or real_launch_device(t))
    q, k_cache, v_cache, seqlens, k_new, v_new = _inputs([1], 2, 1, 1, HEAD_DIM, 4, torch.float32, device, True)
    decode_attention(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new)
    assert entered == [q.device]


def test_split_count_comes_from_multiprocessors_batch_and_cache_slots():
    """Enough programs for two per multiprocessor, at least 256 slots per split, at most MAX_DECODE_SPLITS."""
    assert tiles.decode_splits(programs=8, n_max=131072, multiprocessors=132) == 33  # batch 1, 8 key/value heads
    assert tiles.decode_splits(programs=512, n_max=131072, multiprocessors=132) == 1  # batch 64: the GPU is full
    assert tiles.decode_splits(programs=8, n_max=1024, multiprocessors=132) == 4  # a short cache
    assert tiles.decode_splits(programs=1, n_max=2**20, multiprocessors=132) == tiles.MAX_DECODE_SPLITS
    assert tiles.decode_splits(programs=1, n_max=1, multiprocessors=132) == 1


def test_lengths_out_of_range_that_cannot_be_checked_give_nan_and_write_nothing(device):
    """Under CUDA-graph capture or torch.compile the launcher cannot read cache_seqlens: the operator itself (what
    runs there) writes nothing for a sequence whose append would overflow the cache, reads nothing past it, and
    outputs NaN for it rather than a clamped result; the other sequences are right."""
    torch.manual_seed(11)
    q, k_cache, v_cache, _, k_new, v_new = _inputs([0, 0, 0], 2, 1, 2, HEAD_DIM, 20, torch.float32, device, True)
    seqlens = torch.tensor([3, 19, -1], dtype=torch.int32, device=device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    for num_splits in (1, 2):
        out = torch.ops.decoder_kernels.decode_attention(q, k_cache, v_cache, seqlens, k_new, v_new, 0.25,
                                                         num_splits)
        assert torch.isnan(out[1:]).all() and torch.equal(k_cache[1:], before_k[1:]) and \
            torch.equal(v_cache[1:], before_v[1:])
        reference = _reference(q[:1], k_cache[:1], v_cache[:1], [5], torch.float64, 0.25)
        assert_within_error_rule(out[:1], _reference(q[:1], k_cache[:1], v_cache[:1], [5], torch.float32, 0.25),
                                 reference)


def test_operator_passes_opcheck(device):
    """Schema (the caches declared mutated), fake tensor, dispatch: torch.library.opcheck."""
    torch.manual_seed(12)
    q, k_cache, v_cache, seqlens, k_new, v_new = _inputs([3, 0], 2, 1, 2, HEAD_DIM, 8, torch.float32, device, True)
    torch.library.opcheck(torch.ops.decoder_kernels.decode_attention,
                          (q, k_cache, v_cache, seqlens, k_new, v_new, 0.25, 2))


def test_compiles_into_one_graph_that_appends(device):
    """torch.compile(fullgraph=True) over a decoding step: no graph break (the length check's synchronisation is
    skipped while compiling), the same output, and the append lands in the caller's caches."""
    torch.manual_seed(13)
    q, k_cache, v_cache, seqlens, k_new, v_new = _inputs([3, 6], 2, 1, 1, HEAD_DIM, 8, torch.float32, device, True)
    compiled = torch.compile(decode_attention, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    expected = decode_attention(q, eager_k, eager_v, seqlens, k_new=k_new, v_new=v_new)
    out = compiled(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new)
    assert torch.equal(out, expected) and torch.equal(k_cache, eager_k) and torch.equal(v_cache, eager_v)


def test_bad_inputs_raise_clear_errors_and_leave_the_caches_untouched(device):
    torch.manual_seed(14)
    q, k_cache, v_cache, seqlens, k_new, v_new = _inputs([2, 5], 4, 2, 2, HEAD_DIM, 8, torch.float32, device, True)
    before_k, before_v = k_cache.clone(), v_cache.clone()

    def call(q=q, k_cache=k_cache, v_cache=v_cache, seqlens=seqlens, **options):
        return decode_attention(q, k_cache, v_cache, seqlens, **{"k_new": k_new, "v_new": v_new, **options})

    def lengths(*values, dtype=torch.int32, device=device):
        return torch.tensor(values, dtype=dtype, device=device)

    cases = [
        (ValueError, "query heads .3. must be a multiple of the key/value heads .2.", lambda: call(q=q[:, :3])),
        (ValueError, "too short for the append: 1 slots per sequence, 2 new", lambda: call(
            k_cache=k_cache[:, :, :1], v_cache=v_cache[:, :, :1])),
        (ValueError, r"cache_seqlens must lie in \[0, 6\] .* room for the 2 new tokens; got cache_seqlens\[1\] = 7",
         lambda: call(seqlens=lengths(2, 7))),
        (ValueError, r"got cache_seqlens\[0\] = -1", lambda: call(seqlens=lengths(-1, 0))),
        (ValueError, r"must lie in \[0, 8\] for caches of 8 slots; got cache_seqlens\[0\] = 9", lambda: call(
            seqlens=lengths(9, 0), k_new=None, v_new=None)),
        (TypeError, "cache_seqlens must be an int32 tensor .* got torch.int64", lambda: call(
            seqlens=lengths(2, 5, dtype=torch.int64))),
        (TypeError, "cache_seqlens must be an int32 tensor .* got list", lambda: call(seqlens=[2, 5])),
        (ValueError, r"cache_seqlens must have shape \(B,\) = \(2,\)", lambda: call(seqlens=lengths(2, 5, 1))),
        (ValueError, "cache_seqlens is on meta", lambda: call(seqlens=lengths(2, 5, device="meta"))),
        (TypeError, "k_cache has dtype torch.float16 but q has dtype torch.float32", lambda: call(
            k_cache=k_cache.half(), v_cache=v_cache.half())),
        (TypeError, "k_new has dtype torch.float16", lambda: call(k_new=k_new.half(), v_new=v_new.half())),
        (ValueError, "agree with q .* in batch and head size", lambda: call(q=q[..., :8])),
        (ValueError, "agree with q .* in batch and head size", lambda: call(q=q[:1])),
        (ValueError, "k_cache and v_cache must have the same shape", lambda: call(v_cache=v_cache[:, :1])),
        (ValueError, "k_new and v_new must be given together .* got only k_new", lambda: call(v_new=None)),
        (ValueError, r"k_new must be \(B, H_KV, Nq, D\) = \(2, 2, 2, 16\)", lambda: call(k_new=k_new[:, :, :1])),
        (ValueError, "contiguous last dimension", lambda: call(
            k_cache=k_cache.transpose(2, 3).contiguous().transpose(2, 3))),
        (ValueError, "inference only .* q require", lambda: call(q=q.clone().requires_grad_())),
        (ValueError, "scale must be a finite positive number", lambda: call(scale=-1.0)),
        (ValueError, "must not be empty", lambda: call(q=q[:, :, :0], k_new=k_new[:, :, :0], v_new=v_new[:, :, :0])),
        (ValueError, "head size 512 is not supported", lambda: decode_attention(
            torch.zeros(1, 1, 1, 512, device=device), *(torch.zeros(1, 1, 4, 512, device=device) for _ in range(2)),
            lengths(1)[:1])),
        (TypeError, "positional argument", lambda: decode_attention(q, k_cache, v_cache, seqlens, k_new, v_new)),
    ]
    for error, words, run in cases:
        with pytest.raises(error, match=words):
            run()
        assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v), f"{words}: the caches changed"
    with torch.no_grad():  # inference: inputs that require grad are fine once autograd is off
        call(q=q.clone().requires_grad_())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_later_chunk_with_scores_in_the_hundreds_dominates_the_combine(device, dtype):
    """Keys in three chunks, every key after the first chunk scoring in the hundreds while the first chunk's score
    tens: the chunks' log-sum-exps differ by hundreds, so a combine that weighs the chunks against anything but the
    running maximum of their log-sum-exps (the first chunk's, say) overflows. Sequences of 4 key blocks (whole
    blocks), 2 blocks and 15 keys, and 1 block and 3 keys (its second chunk 3 keys, its third empty) after the
    append. q and k hold integers, so every score is exact in fp16 and fp32 alike, as in the forward's
    large-magnitude test."""
    torch.manual_seed(15)
    block_n, n_q, heads, kv_heads, splits = _block_n(dtype), 2, 4, 2, 3
    final = [4 * block_n, 2 * block_n + 15, block_n + 3]
    lengths = [n - n_q for n in final]
    q, k_cache, v_cache, seqlens, k_new, v_new = _inputs(lengths, heads, kv_heads, n_q, HEAD_DIM, max(final),
                                                         torch.float32, device, True)
    q, k_cache, k_new = (torch.randint(-3, 4, t.shape, device=device).float() for t in (q, k_cache, k_new))
    # Four dimensions every query holds at 8: a key holding them at 8 too scores 256 more than one holding 0
    q[..., :4] = 8
    k_new[..., :4] = 8
    first_chunks = [triton.cdiv(triton.cdiv(n, splits), block_n) * block_n for n in final]  # as the kernel cuts
    for b, chunk in enumerate(first_chunks):
        k_cache[b, :, :chunk, :4] = 0
        k_cache[b, :, chunk:, :4] = 8
    q, k_cache, v_cache, k_new, v_new = (t.to(dtype) for t in (q, k_cache, v_cache, k_new, v_new))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(lengths):
        expected_k[b, :, n:n + n_q], expected_v[b, :, n:n + n_q] = k_new[b], v_new[b]
    scores = q.double() @ expected_k.double().repeat_interleave(heads // kv_heads, dim=1).transpose(-2, -1)
    for b, (n, chunk) in enumerate(zip(final, first_chunks)):
        first, later = scores[b, ..., :chunk].amax(-1), scores[b, ..., chunk:n].amax(-1)
        assert (later > 200).all() and (later - first > 150).all(), "the inputs lost their point"
    out = _decode_attention(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, scale=1.0, num_splits=splits)
    reference = _reference(q, expected_k, expected_v, final, torch.float64, scale=1.0)
    eager = _reference(q, expected_k, expected_v, final, dtype, scale=1.0)
    assert_within_error_rule(out, eager, reference, floor=ABSOLUTE_FLOOR[dtype])
