"""kernels.integrations.flash_attn: flash-attn 2's entry points, called the way flash-attn users call them
(positional dropout_p, softmax_scale, causal; window_size=(left, right)) on (batch, seqlen, heads, headdim)
tensors. Values and gradients against the float64 eager reference by the error rule, and against the kernels' own
API bit for bit; lengths 1, 17 and 100, grouped-query heads, windows, dropout, packed batches, decoding with and
without an append. The tensors reach the kernels as views (nothing copied), the caches are appended in place, and
every option the kernels cannot honour is refused by name.

On CPU the kernels run through Triton's interpreter: one batch or two, 4 query heads on 2 key/value heads, head
size 16."""

import inspect

import pytest
import torch
from attention_helpers import values_and_grads
from conftest import ABSOLUTE_FLOOR, DTYPES, assert_within_error_rule

import kernels
from kernels.integrations import flash_attn
from kernels.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from kernels.reference import attention_reference

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def _inputs(batch, n_q, n_k, dtype, device, heads=HEADS, kv_heads=KV_HEADS):
    """q (batch, n_q, heads, D), k and v (batch, n_k, kv_heads, D): flash-attn's layout, leaves that require grad."""
    q = torch.randn(batch, n_q, heads, HEAD_DIM, device=device)
    k, v = (torch.randn(batch, n_k, kv_heads, HEAD_DIM, device=device) for _ in range(2))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _reference(q, k, v, **options):
    """The eager attention on flash-attn's (batch, seqlen, heads, headdim) tensors."""
    return attention_reference(*(t.transpose(1, 2) for t in (q, k, v)), **options).transpose(1, 2)


def _packed_reference(q, k, v, cu_q, cu_k, **options):
    """The eager attention of each packed sequence alone, (total, heads, headdim) slices, packed back."""
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    outs = [_reference(q[None, bounds_q[b]:bounds_q[b + 1]], k[None, bounds_k[b]:bounds_k[b + 1]],
                       v[None, bounds_k[b]:bounds_k[b + 1]], **options)[0] for b in range(len(bounds_q) - 1)]
    return torch.cat(outs)


def _check_against_reference(fused_call, reference_call, inputs):
    """fused_call's out and gradients against reference_call run in float64, by the error rule against
    reference_call run in the inputs' dtype. Returns the fused out and gradients."""
    dtype = inputs[0].dtype
    grad_out = torch.randn(inputs[0].shape, device=inputs[0].device).to(dtype)  # out has q's shape
    fused = values_and_grads(fused_call, inputs, grad_out)
    reference = values_and_grads(reference_call, [t.double() for t in inputs], grad_out.double())
    low = values_and_grads(reference_call, inputs, grad_out)
    for name, f, e, r in zip(("out", "dq", "dk", "dv"), fused, low, reference):
        assert f.dtype == dtype, f"{name} has dtype {f.dtype}"
        assert_within_error_rule(f, e, r, floor=ABSOLUTE_FLOOR[dtype], name=name)
    return fused


def _heads_first(*tensors):
    return [t.transpose(1, 2) for t in tensors]


# --------------------------------------------------------------------------------------------------------------
# flash_attn_func


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_q, n_k", [(1, 1), (17, 17), (100, 100), (17, 40)], ids=lambda n: str(n))
def test_func_matches_the_reference_and_our_api(device, dtype, n_q, n_k):
    """Causal (bottom-right when the lengths differ), a softmax scale, grouped-query heads: written as flash-attn
    users write it, positionally."""
    torch.manual_seed(n_q + n_k)
    inputs = _inputs(2 if n_q < 100 else 1, n_q, n_k, dtype, device)
    out = _check_against_reference(lambda q, k, v: flash_attn_func(q, k, v, 0.0, 0.3, True),
                                   lambda q, k, v: _reference(q, k, v, causal=True, scale=0.3), inputs)[0]
    assert out.shape == inputs[0].shape and out.is_contiguous()
    ours = kernels.attention(*_heads_first(*inputs), causal=True, scale=0.3).transpose(1, 2)
    assert torch.equal(out, ours)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal, window_size", [(False, (5, 3)), (True, (8, -1))], ids=["both-sides", "causal"])
def test_func_window_size_is_left_then_right(device, dtype, causal, window_size):
    torch.manual_seed(sum(window_size))
    inputs = _inputs(1, 33, 33, dtype, device)
    _check_against_reference(lambda q, k, v: flash_attn_func(q, k, v, 0.0, None, causal, window_size=window_size),
                             lambda q, k, v: _reference(q, k, v, causal=causal, window=window_size), inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_func_dropout_draws_the_seed_from_torchs_generator(device, dtype):
    """Positional dropout_p: the mask `kernels.attention_dropout_mask` gives for the same generator state."""
    torch.manual_seed(3)
    inputs = _inputs(1, 33, 33, dtype, device)
    torch.manual_seed(7)
    keep = kernels.attention_dropout_mask(*_heads_first(*inputs[:2]), 0.2)

    def fused(q, k, v):
        torch.manual_seed(7)
        return flash_attn_func(q, k, v, 0.2, None, True)

    _check_against_reference(fused, lambda q, k, v: _reference(q, k, v, keep=keep, dropout_p=0.2), inputs)


def test_func_returns_flash_attns_softmax_lse_and_no_probabilities(device):
    q, k, v = _inputs(2, 17, 17, torch.float32, device)
    out, softmax_lse, s_dmask = flash_attn_func(q, k, v, return_attn_probs=True)
    ours, lse = kernels.attention(*_heads_first(q, k, v), causal=False, return_lse=True)
    assert torch.equal(out, ours.transpose(1, 2))
    assert softmax_lse.shape == (2, HEADS, 17) and torch.equal(softmax_lse, lse)
    assert s_dmask.numel() == 0 and s_dmask.dtype == q.dtype  # as flash-attn without dropout


def test_func_hands_the_kernel_views_of_a_packed_projection(device, monkeypatch):
    """q, k, v unbound from one (batch, seqlen, 3, heads, headdim) projection, as flash-attn users slice them,
    reach the kernel as transposed views of the same memory, and the output is (batch, seqlen, heads, headdim)
    in memory."""
    qkv = torch.randn(2, 17, 3, HEADS, HEAD_DIM, device=device)
    q, k, v = qkv.unbind(2)
    received = []

    def spy(*tensors, **options):
        received.extend(tensors)
        return kernels.attention(*tensors, **options)

    monkeypatch.setattr(flash_attn, "attention", spy)
    out = flash_attn_func(q, k, v, causal=True)
    for given, seen in zip((q, k, v), received):
        assert seen.data_ptr() == given.data_ptr() and seen.stride() == given.transpose(1, 2).stride()
    assert out.is_contiguous() and out.shape == q.shape


# --------------------------------------------------------------------------------------------------------------
# flash_attn_varlen_func


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_varlen_matches_the_reference_and_our_api(device, dtype):
    """Packed sequences of 1, 17 and 100 queries over 5, 17 and 100 keys: causal bottom-right in each."""
    torch.manual_seed(1)
    lengths_q, lengths_k = [1, 17, 100], [5, 17, 100]
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=device)
                  for n in (lengths_q, lengths_k))
    inputs = [t[0] for t in _inputs(1, sum(lengths_q), sum(lengths_k), dtype, device)]
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = _check_against_reference(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 100, 100, 0.0, None, True),
        lambda q, k, v: _packed_reference(q, k, v, cu_q, cu_k, causal=True), inputs)[0]
    assert torch.equal(out, kernels.attention_varlen(*inputs, cu_q, cu_k, 100, 100, causal=True))


def test_varlen_returns_flash_attns_softmax_lse_and_no_probabilities(device):
    q, k, v = (torch.randn(20, HEADS, HEAD_DIM, device=device) for _ in range(3))
    cu = torch.tensor([0, 3, 20], dtype=torch.int32, device=device)
    out, softmax_lse, s_dmask = flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, return_attn_probs=True)
    ours, lse = kernels.attention_varlen(q, k, v, cu, cu, 17, 17, causal=False, return_lse=True)
    assert torch.equal(out, ours) and torch.equal(softmax_lse, lse)
    assert softmax_lse.shape == (HEADS, 20) and s_dmask.numel() == 0  # flash-attn's varlen layout


def test_varlen_hands_the_kernel_the_packed_tensors_as_they_are(device, monkeypatch):
    qkv = torch.randn(20, 3, HEADS, HEAD_DIM, device=device)  # (total, 3, heads, headdim)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 3, 20], dtype=torch.int32, device=device)
    received = []

    def spy(*arguments, **options):
        received.extend(arguments[:3])
        return kernels.attention_varlen(*arguments, **options)

    monkeypatch.setattr(flash_attn, "attention_varlen", spy)
    flash_attn_varlen_func(q, k, v, cu, cu, 17, 17)
    assert all(seen is given for given, seen in zip((q, k, v), received))


# --------------------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache


def _caches(batch, n_max, dtype, device):
    """k_cache and v_cache in flash-attn's layout, (batch, seqlen_cache, nheads_k, headdim), random everywhere."""
    return [torch.randn(batch, n_max, KV_HEADS, HEAD_DIM, device=device).to(dtype) for _ in range(2)]


def _cache_reference(q, k_cache, v_cache, lengths, causal=True):
    """Each sequence's queries against its first L keys, causal bottom-right, in float64."""
    return torch.cat([_reference(q[b:b + 1].double(), k_cache[b:b + 1, :n].double(), v_cache[b:b + 1, :n].double(),
                                 causal=causal) for b, n in enumerate(lengths)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_q", [1, 3])
@pytest.mark.parametrize("append", [True, False], ids=["append", "read-only"])
def test_with_kvcache_appends_in_place_and_attends(device, dtype, n_q, append):
    """Cache lengths 0, 1 and 17 (with 3 queries and no append, queries that see no key); the new keys and values
    land in the caller's caches at each sequence's length and nowhere else; the output is decode_attention's."""
    torch.manual_seed(n_q + append)
    lengths = [0, 1, 17]
    q = torch.randn(3, n_q, HEADS, HEAD_DIM, device=device).to(dtype)
    k_cache, v_cache = _caches(3, 24, dtype, device)
    k, v = (torch.randn(3, n_q, KV_HEADS, HEAD_DIM, device=device).to(dtype) if append else None for _ in range(2))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    if append:
        for b, n in enumerate(lengths):
            expected_k[b, n:n + n_q], expected_v[b, n:n + n_q] = k[b], v[b]
    ours_k, ours_v = k_cache.clone(), v_cache.clone()
    cache_seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)

    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, causal=True)

    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v), "the caches after the call"
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    final = [n + n_q if append else n for n in lengths]
    eager = torch.cat([_reference(q[b:b + 1], expected_k[b:b + 1, :n], expected_v[b:b + 1, :n], causal=True)
                       for b, n in enumerate(final)])
    assert_within_error_rule(out, eager, _cache_reference(q, expected_k, expected_v, final))
    new = [None, None] if k is None else _heads_first(k, v)
    ours = kernels.decode_attention(*_heads_first(q, ours_k, ours_v), cache_seqlens, k_new=new[0], v_new=new[1])
    assert torch.equal(out, ours.transpose(1, 2))


def test_with_kvcache_reads_and_writes_the_callers_caches_through_views(device, monkeypatch):
    q = torch.randn(2, 1, HEADS, HEAD_DIM, device=device)
    k_cache, v_cache = _caches(2, 16, torch.float32, device)
    k, v = (torch.randn(2, 1, KV_HEADS, HEAD_DIM, device=device) for _ in range(2))
    received = []

    def spy(*arguments, **options):
        received.extend([*arguments[:3], options["k_new"], options["v_new"]])
        return kernels.decode_attention(*arguments, **options)

    monkeypatch.setattr(flash_attn, "decode_attention", spy)
    flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=4)
    for given, seen in zip((q, k_cache, v_cache, k, v), received):
        assert seen.data_ptr() == given.data_ptr() and seen.stride() == given.transpose(1, 2).stride()
    assert torch.equal(k_cache[:, 4], k[:, 0]) and torch.equal(v_cache[:, 4], v[:, 0])


def test_with_kvcache_defaults_a_full_cache_and_sees_all_of_it(device):
    """flash-attn's defaults: no cache_seqlens (the whole cache is filled) and causal=False, which with one query
    sees every key; one int for every sequence's length."""
    torch.manual_seed(2)
    q = torch.randn(2, 1, HEADS, HEAD_DIM, device=device)
    k_cache, v_cache = _caches(2, 20, torch.float32, device)
    out = flash_attn_with_kvcache(q, k_cache, v_cache)
    assert_within_error_rule(out, _reference(q, k_cache, v_cache, causal=False),
                             _cache_reference(q, k_cache, v_cache, [20, 20], causal=False))
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=9)
    assert_within_error_rule(out, _reference(q, k_cache[:, :9], v_cache[:, :9], causal=False),
                             _cache_reference(q, k_cache, v_cache, [9, 9], causal=False))


# --------------------------------------------------------------------------------------------------------------
# Arguments


FLASH_ATTN_SIGNATURES = {  # flash-attn 2's, from flash_attn/flash_attn_interface.py
    flash_attn_func: "(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, "
                     "alibi_slopes=None, deterministic=False, return_attn_probs=False)",
    flash_attn_varlen_func: "(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, "
                            "softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, "
                            "alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None)",
    flash_attn_with_kvcache: "(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, "
                             "cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None, "
                             "softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, "
                             "rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False)",
}


@pytest.mark.parametrize("function", FLASH_ATTN_SIGNATURES, ids=lambda f: f.__name__)
def test_arguments_are_flash_attns_names_order_and_defaults(function):
    assert str(inspect.signature(function)) == FLASH_ATTN_SIGNATURES[function]


def _call(function, device, n_q=3, **options):
    """One small call of "func", "varlen" or "kvcache", options on top of valid arguments."""
    q = torch.randn(1, n_q, 2, HEAD_DIM, device=device)
    k, v = (torch.randn(1, n_q, 2, HEAD_DIM, device=device) for _ in range(2))
    if function == "func":
        return flash_attn_func(**{"q": q, "k": k, "v": v, **options})
    if function == "varlen":
        cu = torch.tensor([0, n_q], dtype=torch.int32, device=device)
        return flash_attn_varlen_func(**{"q": q[0], "k": k[0], "v": v[0], "cu_seqlens_q": cu, "cu_seqlens_k": cu,
                                         "max_seqlen_q": n_q, "max_seqlen_k": n_q, **options})
    k_cache, v_cache = (torch.zeros(1, 8, 2, HEAD_DIM, device=device) for _ in range(2))
    return flash_attn_with_kvcache(**{"q": q, "k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v,
                                      "cache_seqlens": 2, "causal": True, **options})


_TENSOR = torch.ones(2)  # any tensor: each option below is refused before the tensors are used
REFUSED = [  # (function, options, error, what the message names)
    ("func", dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("func", dict(q=torch.ones(3, 2, 16)), ValueError, r"q must be \(batch, seqlen, nheads, headdim\)"),
    ("varlen", dict(k=torch.ones(1, 3, 2, 16)), ValueError, r"k must be \(total, nheads, headdim\)"),
    ("func", dict(softcap=30.0), ValueError, "softcap"),
    ("varlen", dict(softcap="30"), TypeError, "softcap"),
    ("func", dict(alibi_slopes=_TENSOR), ValueError, "alibi_slopes"),
    ("varlen", dict(alibi_slopes=_TENSOR), ValueError, "alibi_slopes"),
    ("func", dict(dropout_p=0.1, return_attn_probs=True), ValueError, "return_attn_probs"),
    ("varlen", dict(return_attn_probs=1), TypeError, "return_attn_probs"),
    ("func", dict(deterministic=None), TypeError, "deterministic"),
    ("func", dict(causal=1), TypeError, "causal"),
    ("func", dict(softmax_scale="0.1"), TypeError, "softmax_scale"),
    ("varlen", dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    ("func", dict(window_size=4), TypeError, "window_size"),
    ("varlen", dict(window_size=(-2, 0)), ValueError, "window_size"),
    ("func", dict(dropout_p=1.5), ValueError, "dropout_p"),
    ("varlen", dict(block_table=_TENSOR), ValueError, "block_table"),
    ("kvcache", dict(rotary_cos=_TENSOR, rotary_sin=_TENSOR), ValueError, "rotary_cos"),
    ("kvcache", dict(cache_batch_idx=_TENSOR), ValueError, "cache_batch_idx"),
    ("kvcache", dict(cache_leftpad=_TENSOR), ValueError, "cache_leftpad"),
    ("kvcache", dict(block_table=_TENSOR), ValueError, "block_table"),
    ("kvcache", dict(alibi_slopes=_TENSOR), ValueError, "alibi_slopes"),
    ("kvcache", dict(softcap=50.0), ValueError, "softcap"),
    ("kvcache", dict(num_splits=2), ValueError, "num_splits"),
    ("kvcache", dict(num_splits=1.0), TypeError, "num_splits"),
    ("kvcache", dict(return_softmax_lse=True), ValueError, "return_softmax_lse"),
    ("kvcache", dict(rotary_interleaved="yes"), TypeError, "rotary_interleaved"),
    ("kvcache", dict(causal=False), ValueError, "causal=False with 3 queries"),
    ("kvcache", dict(causal=False, window_size=(-1, -1)), ValueError, "causal=False with 3 queries"),
    ("kvcache", dict(window_size=(4, 0)), ValueError, "window_size"),
    ("kvcache", dict(v=None), ValueError, "k and v must be given together"),
    ("kvcache", dict(cache_seqlens=None), ValueError, "cache_seqlens must be given with k and v"),
    ("kvcache", dict(k=torch.ones(1, 2, 2, 16), v=torch.ones(1, 2, 2, 16)), ValueError, "k must be"),
]


@pytest.mark.parametrize("function, options, error, message", REFUSED,
                         ids=[f"{f}-{','.join(o)}" for f, o, _, _ in REFUSED])
def test_what_cannot_be_honoured_is_refused_by_name(device, function, options, error, message):
    with pytest.raises(error, match=message):
        _call(function, device, **options)


ACCEPTED = [  # options that change nothing here: the kernels are always deterministic, and so on
    ("func", dict(deterministic=True)),
    ("func", dict(window_size=[-1, -1], softcap=0)),
    ("varlen", dict(deterministic=True, block_table=None)),
    ("kvcache", dict(rotary_interleaved=False, num_splits=0)),
    ("kvcache", dict(window_size=(7, 5))),  # a left side reaching slot 0 from the last of 8 slots; causal
    ("kvcache", dict(causal=False, window_size=(-1, 0))),  # a right side of 0 is causal
]


@pytest.mark.parametrize("function, options", ACCEPTED, ids=[f"{f}-{','.join(o)}" for f, o in ACCEPTED])
def test_options_the_kernels_honour_as_they_are_accepted(device, function, options):
    torch.manual_seed(0)
    plain = _call(function, device)
    torch.manual_seed(0)
    assert torch.equal(_call(function, device, **options), plain)


def test_with_kvcache_one_query_is_the_same_causal_or_not(device):
    torch.manual_seed(0)
    causal = _call("kvcache", device, n_q=1)
    torch.manual_seed(0)
    assert torch.equal(_call("kvcache", device, n_q=1, causal=False), causal)
