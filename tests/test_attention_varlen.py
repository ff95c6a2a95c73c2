"""kernels.attention_varlen: a batch of ragged sequences packed without padding, each attending within itself,
against the float64 eager reference run sequence by sequence (values and all gradients, by the error rule);
zero-length sequences, Nq != Nk per sequence, grouped-query heads, windows, dropout; bad input."""

import pytest
import torch
from attention_helpers import check_log_sum_exp
from conftest import ABSOLUTE_FLOOR, DTYPES, assert_within_error_rule

from kernels import attention_varlen, attention_varlen_dropout_mask
from kernels.reference import attention_reference

pytestmark = pytest.mark.usefixtures("poisoned_allocations", "gpu_tiles")

# Per-sequence (Nq, Nk): a zero-length query sequence, a zero-length key sequence, length 1, several blocks, Nq != Nk.
LENGTHS = [(5, 7), (0, 3), (40, 40), (1, 1), (70, 45), (9, 0), (33, 64)]


def _cu_seqlens(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _packed_inputs(lengths, heads, kv_heads, head_dim, dtype, device):
    total_q, total_k = sum(n for n, _ in lengths), sum(n for _, n in lengths)
    q = torch.randn(total_q, heads, head_dim, device=device).to(dtype).requires_grad_()
    k = torch.randn(total_k, kv_heads, head_dim, device=device).to(dtype).requires_grad_()
    v = torch.randn(total_k, kv_heads, head_dim, device=device).to(dtype).requires_grad_()
    cu_q = _cu_seqlens([n for n, _ in lengths], device)
    cu_k = _cu_seqlens([n for _, n in lengths], device)
    return q, k, v, cu_q, cu_k


def _per_sequence_reference(q, k, v, cu_q, cu_k, grad_out, keeps=None, dropout_p=0.0, **options):
    """out, dq, dk, dv of the eager reference run on each sequence alone, packed back like the inputs."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    outs = []
    for b in range(cu_q.numel() - 1):
        rows_q, rows_k = slice(cu_q[b].item(), cu_q[b + 1].item()), slice(cu_k[b].item(), cu_k[b + 1].item())
        if rows_k.stop == rows_k.start:  # no key at all: every query sees none and outputs 0
            outs.append(q[rows_q] * 0)
            continue
        heads_first = [t[rows].transpose(0, 1)[None] for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k))]
        keep = None if keeps is None else keeps[b][None]
        outs.append(attention_reference(*heads_first, keep=keep, dropout_p=dropout_p, **options)[0].transpose(0, 1))
    out = torch.cat(outs)
    return [out, *torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype), allow_unused=True,
                                      materialize_grads=True)]


def _check(lengths, heads, kv_heads, dtype, device, dropout_p=0.0, seed=None, **options):
    torch.manual_seed(len(lengths) + heads + kv_heads)
    q, k, v, cu_q, cu_k = _packed_inputs(lengths, heads, kv_heads, 16, dtype, device)
    max_q, max_k = max(n for n, _ in lengths), max(n for _, n in lengths)
    grad_out = torch.randn(q.shape, device=device).to(dtype)
    out = attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, seed=seed, **options)
    fused = [out, *torch.autograd.grad(out, (q, k, v), grad_out)]
    keeps = None
    if dropout_p:
        keeps = attention_varlen_dropout_mask(q, k, cu_q, cu_k, dropout_p, seed=seed)
    reference = _per_sequence_reference(*(t.double() for t in (q, k, v)), cu_q, cu_k, grad_out.double(), keeps,
                                        dropout_p, **options)
    low = _per_sequence_reference(q, k, v, cu_q, cu_k, grad_out, keeps, dropout_p, **options)
    for name, f, e, r in zip(("out", "dq", "dk", "dv"), fused, low, reference):
        assert f.dtype == dtype and f.shape == r.shape, name
        assert_within_error_rule(f, e, r, floor=ABSOLUTE_FLOOR[dtype], name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_sequences_match_each_sequence_alone(device, dtype, causal):
    _check(LENGTHS, 2, 2, dtype, device, causal=causal)


@pytest.mark.parametrize("kv_heads", [1, 2], ids=lambda h: f"kv{h}")
def test_packed_grouped_query_heads(device, kv_heads):
    _check(LENGTHS, 4, kv_heads, torch.float16, device, causal=True)


@pytest.mark.parametrize("window", [(8, 0), (3, 5), (0, 0)], ids=str)
def test_packed_sliding_windows(device, window):
    _check(LENGTHS, 2, 1, torch.float32, device, causal=False, window=window)


def test_packed_dropout_uses_the_helpers_masks(device):
    _check(LENGTHS, 2, 2, torch.float32, device, causal=True, dropout_p=0.3, seed=11)


def test_packed_log_sum_exp_is_heads_by_rows(device):
    q, k, v, cu_q, cu_k = _packed_inputs(LENGTHS, 2, 2, 16, torch.float32, device)
    out, lse = attention_varlen(q, k, v, cu_q, cu_k, 70, 64, return_lse=True)
    assert lse.shape == (2, q.shape[0]) and lse.dtype == torch.float32
    empty_keys = slice(cu_q[5].item(), cu_q[6].item())  # the sequence with no key
    assert torch.isinf(lse[:, empty_keys]).all() and (lse[:, empty_keys] < 0).all()


def test_bad_packed_inputs_raise_clear_errors(device):
    q, k, v, cu_q, cu_k = _packed_inputs([(4, 4), (6, 6)], 2, 2, 16, torch.float32, device)

    def call(cu_q=cu_q, cu_k=cu_k, max_q=6, max_k=6, **options):
        return attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **options)

    cases = [
        (TypeError, "int32", lambda: call(cu_q=cu_q.long())),
        (TypeError, "int32", lambda: call(cu_k=[0, 4, 10])),
        (ValueError, "same batch", lambda: call(cu_k=cu_k[:2])),
        (ValueError, "never decrease", lambda: call(cu_q=torch.tensor([0, 7, 4], dtype=torch.int32, device=device))),
        (ValueError, "start at 0", lambda: call(cu_q=torch.tensor([1, 4, 10], dtype=torch.int32, device=device))),
        (ValueError, "packed length 10", lambda: call(cu_k=torch.tensor([0, 4, 9], dtype=torch.int32, device=device))),
        (ValueError, "more than max_seqlen", lambda: call(max_q=5)),
        (ValueError, "positive int", lambda: call(max_k=0)),
        (ValueError, "is on", lambda: call(cu_q=cu_q.to("meta"))),
        (ValueError, "window", lambda: call(window=(4, -3))),
        (ValueError, "3 dimensions", lambda: attention_varlen(q[None], k, v, cu_q, cu_k, 6, 6)),
    ]
    for error, words, run in cases:
        with pytest.raises(error, match=words):
            run()


# A longest key sequence past the longest query sequence by more than the largest block of any tile (128), and
# the reverse: a launch grid sized from the other maximum misses whole blocks of keys (or queries).
MORE_KEYS_THAN_QUERIES = [(5, 7), (0, 3), (20, 170), (1, 1), (9, 0), (33, 64)]
MORE_QUERIES_THAN_KEYS = [(n_k, n_q) for n_q, n_k in MORE_KEYS_THAN_QUERIES]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("lengths", [MORE_KEYS_THAN_QUERIES, MORE_QUERIES_THAN_KEYS],
                         ids=["more-keys", "more-queries"])
def test_packed_longest_keys_and_queries_far_apart(device, dtype, causal, lengths):
    """max_seqlen_k 170 and max_seqlen_q 33, and the reverse (a cached prefix, cross-attention): values and
    every gradient (dK and dV of every key block), each sequence alone."""
    _check(lengths, 2, 1, dtype, device, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_packed_log_sum_exp_in_every_dtype_matches_float64(device, dtype):
    """return_lse of packed fp32, fp16 and bf16 inputs (under the interpreter, bf16 takes the fp32 kernels), laid
    out (H, total_q), against each sequence's float64 log-sum-exp by the error rule: -inf for the sequence
    without keys and for the rows that see none."""
    torch.manual_seed(30)
    q, k, v, cu_q, cu_k = _packed_inputs(LENGTHS, 4, 2, 16, dtype, device)
    with torch.no_grad():
        out, lse = attention_varlen(q, k, v, cu_q, cu_k, 70, 64, scale=0.3, return_lse=True)
    assert lse.shape == (4, q.shape[0]) and lse.dtype == torch.float32
    for b, (n_q, n_k) in enumerate(LENGTHS):
        rows_q, rows_k = slice(cu_q[b].item(), cu_q[b + 1].item()), slice(cu_k[b].item(), cu_k[b + 1].item())
        if n_q and n_k:
            check_log_sum_exp(lse[None, :, rows_q], q[rows_q].transpose(0, 1)[None], k[rows_k].transpose(0, 1)[None],
                              0.3, causal=True, name=f"lse of sequence {b}")
    assert torch.isneginf(lse[:, cu_q[5].item():cu_q[6].item()]).all()  # (9, 0): no key at all
