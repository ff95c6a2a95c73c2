"""Bad arguments to every public function: a TypeError for a wrong type, a ValueError for a wrong value, and a
message naming the argument, raised before anything reaches Triton. One table per function, each row a call with
one argument wrong; and a launch no tile rule matches is a LookupError naming its key."""

import math
import types

import pytest
import torch

from kernels import (
    FusedLayerNorm,
    FusedMultiHeadAttention,
    add_layer_norm,
    attention,
    attention_dropout_mask,
    attention_varlen,
    attention_varlen_dropout_mask,
    decode_attention,
    layer_norm,
)


def _assert_raises_naming(error, argument, call):
    """call() raises exactly `error` (not a subclass or another type), with `argument` as a word of its message."""
    with pytest.raises((TypeError, ValueError)) as raised:
        call()
    assert type(raised.value) is error, f"{argument}: {type(raised.value).__name__}: {raised.value}"
    assert argument in _words(str(raised.value)), f"{argument} not named in: {raised.value}"


def _words(message):
    return set(message.replace("(", " ").replace(")", " ").replace(",", " ").replace(":", " ").replace("=", " ")
               .replace(".", " ").split())


def _run(table):
    for error, argument, call in table:
        _assert_raises_naming(error, argument, call)


def test_attention(device):
    q, k, v = (torch.randn(1, 2, 8, 16, device=device) for _ in range(3))

    def call(**options):
        tensors = {"q": q, "k": k, "v": v}
        tensors.update({name: options.pop(name) for name in ("q", "k", "v") if name in options})
        return lambda: attention(tensors["q"], tensors["k"], tensors["v"], **options)

    _run([
        (TypeError, "q", call(q=q.tolist())),
        (TypeError, "k", call(k=k.int())),
        (TypeError, "v", call(v=v.double())),
        (TypeError, "k", call(k=k.half())),
        (ValueError, "q", call(q=q[0])),
        (ValueError, "k", call(k=k.to("meta"))),
        (ValueError, "v", call(v=v[:, :1])),
        (TypeError, "causal", call(causal=1)),
        (TypeError, "causal", call(causal=None)),
        (TypeError, "window", call(window=3)),
        (TypeError, "window", call(window=(1.5, 2))),
        (TypeError, "window", call(window=(True, 0))),
        (ValueError, "window", call(window=(1, 2, 3))),
        (ValueError, "window", call(window=(-2, 0))),
        (TypeError, "dropout_p", call(dropout_p="0.1")),
        (TypeError, "dropout_p", call(dropout_p=True)),
        (ValueError, "dropout_p", call(dropout_p=1.0)),
        (ValueError, "dropout_p", call(dropout_p=-0.1)),
        (TypeError, "scale", call(scale="0.25")),
        (TypeError, "scale", call(scale=True)),
        (ValueError, "scale", call(scale=0.0)),
        (ValueError, "scale", call(scale=math.nan)),
        (TypeError, "seed", call(dropout_p=0.1, seed=True)),
        (TypeError, "seed", call(dropout_p=0.1, seed=1.5)),
        (TypeError, "seed", call(seed="7")),  # checked with or without dropout
        (ValueError, "seed", call(dropout_p=0.1, seed=-1)),
        (ValueError, "seed", call(dropout_p=0.1, seed=2**31)),
        (TypeError, "return_lse", call(return_lse=1)),
    ])


def _packed(device):
    """Two sequences of 4 and 6 tokens, packed: q, k, v (10, 2, 16) and their cu_seqlens."""
    q, k, v = (torch.randn(10, 2, 16, device=device) for _ in range(3))
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    return q, k, v, cu_seqlens


def _cu_seqlens_table(device, cu):
    """Bad cu_seqlens, as (error, argument, cu_seqlens_q, cu_seqlens_k): attention_varlen and its mask helper
    check them alike."""
    offsets = lambda *values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    return [
        (TypeError, "cu_seqlens_q", cu.long(), cu),
        (TypeError, "cu_seqlens_k", cu, [0, 4, 10]),
        (ValueError, "cu_seqlens_q", cu[None], cu),
        (ValueError, "cu_seqlens_k", cu, cu[:1]),
        (ValueError, "cu_seqlens_q", cu.to("meta"), cu),
        (ValueError, "cu_seqlens_k", cu, cu[:2]),  # a batch of one against a batch of two
        (ValueError, "cu_seqlens_q", offsets(1, 4, 10), cu),
        (ValueError, "cu_seqlens_q", offsets(0, 7, 4), cu),
        (ValueError, "cu_seqlens_k", cu, offsets(0, 4, 9)),
    ]


def test_attention_varlen_and_its_mask_check_cu_seqlens_alike(device):
    q, k, v, cu = _packed(device)
    for error, argument, cu_q, cu_k in _cu_seqlens_table(device, cu):
        _assert_raises_naming(error, argument, lambda: attention_varlen(q, k, v, cu_q, cu_k, 6, 6))
        _assert_raises_naming(error, argument, lambda: attention_varlen_dropout_mask(q, k, cu_q, cu_k, 0.1))


def test_attention_varlen(device):
    q, k, v, cu = _packed(device)

    def call(max_q=6, max_k=6, **options):
        return lambda: attention_varlen(q, k, v, cu, cu, max_q, max_k, **options)

    _run([
        (ValueError, "q", lambda: attention_varlen(q[None], k, v, cu, cu, 6, 6)),
        (TypeError, "v", lambda: attention_varlen(q, k, v.half(), cu, cu, 6, 6)),
        (TypeError, "max_seqlen_q", call(max_q=6.0)),
        (TypeError, "max_seqlen_k", call(max_k=True)),
        (ValueError, "max_seqlen_k", call(max_k=0)),
        (ValueError, "max_seqlen_q", call(max_q=5)),  # shorter than the longest sequence
        (TypeError, "causal", call(causal="yes")),
        (TypeError, "window", call(window=[0.5, 0])),
        (ValueError, "window", call(window=(4, -3))),
        (TypeError, "dropout_p", call(dropout_p=None)),
        (ValueError, "dropout_p", call(dropout_p=2.0)),
        (TypeError, "scale", call(scale=[1.0])),
        (TypeError, "seed", call(dropout_p=0.1, seed=True)),
        (ValueError, "seed", call(dropout_p=0.1, seed=-3)),
        (TypeError, "return_lse", call(return_lse=None)),
    ])


def test_dropout_mask_helpers(device):
    q, k = (torch.randn(1, 2, 8, 16, device=device) for _ in range(2))
    packed_q, packed_k, _, cu = _packed(device)
    _run([
        (TypeError, "q", lambda: attention_dropout_mask(q.tolist(), k, 0.1)),
        (TypeError, "k", lambda: attention_dropout_mask(q, k.int(), 0.1)),
        (ValueError, "k", lambda: attention_dropout_mask(q, k[0], 0.1)),
        (ValueError, "k", lambda: attention_dropout_mask(q, torch.randn(2, 2, 8, 16, device=device), 0.1)),
        (ValueError, "q", lambda: attention_dropout_mask(torch.randn(1, 3, 8, 16, device=device), k, 0.1)),
        (TypeError, "dropout_p", lambda: attention_dropout_mask(q, k, "0.1")),
        (ValueError, "dropout_p", lambda: attention_dropout_mask(q, k, 1.5)),
        (TypeError, "seed", lambda: attention_dropout_mask(q, k, 0.1, seed=False)),
        (ValueError, "seed", lambda: attention_dropout_mask(q, k, 0.1, seed=2**31)),
        (TypeError, "q", lambda: attention_varlen_dropout_mask(packed_q.long(), packed_k, cu, cu, 0.1)),
        (ValueError, "q", lambda: attention_varlen_dropout_mask(packed_q[None], packed_k, cu, cu, 0.1)),
        (TypeError, "dropout_p", lambda: attention_varlen_dropout_mask(packed_q, packed_k, cu, cu, True)),
        (ValueError, "dropout_p", lambda: attention_varlen_dropout_mask(packed_q, packed_k, cu, cu, -0.5)),
        (TypeError, "seed", lambda: attention_varlen_dropout_mask(packed_q, packed_k, cu, cu, 0.1, seed=0.5)),
    ])


def test_decode_attention(device):
    q = torch.randn(2, 4, 1, 16, device=device)
    k_cache, v_cache = (torch.randn(2, 2, 8, 16, device=device) for _ in range(2))
    k_new, v_new = (torch.randn(2, 2, 1, 16, device=device) for _ in range(2))
    lengths = torch.tensor([2, 5], dtype=torch.int32, device=device)

    def call(**changes):
        arguments = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=lengths, k_new=k_new, v_new=v_new)
        arguments.update(changes)
        tensors = [arguments.pop(name) for name in ("q", "k_cache", "v_cache", "cache_seqlens")]
        return lambda: decode_attention(*tensors, **arguments)

    _run([
        (TypeError, "q", call(q=q.tolist())),
        (TypeError, "k_cache", call(k_cache=k_cache.int())),
        (TypeError, "v_cache", call(v_cache=v_cache.half())),
        (TypeError, "k_new", call(k_new=k_new.double(), v_new=v_new.double())),
        (ValueError, "v_cache", call(v_cache=v_cache[:, :1])),
        (ValueError, "k_new", call(k_new=k_new[:, :, :, :8])),
        (ValueError, "k_new", call(v_new=None)),
        (TypeError, "cache_seqlens", call(cache_seqlens=[2, 5])),
        (TypeError, "cache_seqlens", call(cache_seqlens=True)),
        (TypeError, "cache_seqlens", call(cache_seqlens=2.0)),
        (TypeError, "cache_seqlens", call(cache_seqlens=lengths.long())),
        (ValueError, "cache_seqlens", call(cache_seqlens=-1)),
        (ValueError, "cache_seqlens", call(cache_seqlens=lengths[:1])),
        (ValueError, "cache_seqlens", call(cache_seqlens=lengths + 5)),
        (TypeError, "scale", call(scale="0.25")),
        (ValueError, "scale", call(scale=-1.0)),
    ])


def test_layer_norm_and_add_layer_norm(device):
    x, residual = (torch.randn(4, 8, device=device) for _ in range(2))
    weight, bias = torch.ones(8, device=device), torch.zeros(8, device=device)
    _run([
        (TypeError, "x", lambda: layer_norm(x.tolist())),
        (TypeError, "x", lambda: layer_norm(x.long())),
        (ValueError, "x", lambda: layer_norm(x[:, :0])),
        (TypeError, "weight", lambda: layer_norm(x, weight.int())),
        (ValueError, "weight", lambda: layer_norm(x, weight[:7])),
        (ValueError, "bias", lambda: layer_norm(x, weight, bias[None])),
        (TypeError, "eps", lambda: layer_norm(x, eps="1e-5")),
        (TypeError, "eps", lambda: layer_norm(x, eps=True)),
        (TypeError, "eps", lambda: layer_norm(x, eps=None)),
        (ValueError, "eps", lambda: layer_norm(x, eps=-1.0)),
        (ValueError, "eps", lambda: layer_norm(x, eps=math.nan)),
        (TypeError, "residual", lambda: add_layer_norm(x, residual.tolist())),
        (TypeError, "residual", lambda: add_layer_norm(x, residual.int())),
        (ValueError, "residual", lambda: add_layer_norm(x, residual[:, :7])),
        (ValueError, "residual", lambda: add_layer_norm(x, residual.to("meta"))),
        (TypeError, "eps", lambda: add_layer_norm(x, residual, eps="small")),
        (ValueError, "eps", lambda: add_layer_norm(x, residual, eps=-1e-5)),
    ])


def test_modules(device):
    attention_module = FusedMultiHeadAttention(32, 2).to(device)
    norm = FusedLayerNorm(8).to(device)
    _run([
        (TypeError, "n_embd", lambda: FusedMultiHeadAttention(32.0, 2)),
        (ValueError, "n_head", lambda: FusedMultiHeadAttention(32, 0)),
        (ValueError, "n_embd", lambda: FusedMultiHeadAttention(30, 4)),
        (TypeError, "backend", lambda: FusedMultiHeadAttention(32, 2, backend=None)),
        (ValueError, "backend", lambda: FusedMultiHeadAttention(32, 2, backend="flash")),
        (TypeError, "dropout", lambda: FusedMultiHeadAttention(32, 2, dropout="0.1")),
        (ValueError, "dropout", lambda: FusedMultiHeadAttention(32, 2, dropout=1.0)),
        (TypeError, "x", lambda: attention_module(torch.randn(1, 4, 32).tolist())),
        (ValueError, "x", lambda: attention_module(torch.randn(1, 4, 16, device=device))),
        (TypeError, "normalized_shape", lambda: FusedLayerNorm("8")),
        (TypeError, "normalized_shape", lambda: FusedLayerNorm(8.0)),
        (ValueError, "normalized_shape", lambda: FusedLayerNorm((4, 8))),
        (ValueError, "normalized_shape", lambda: FusedLayerNorm(0)),
        (TypeError, "eps", lambda: FusedLayerNorm(8, eps="1e-5")),
        (ValueError, "eps", lambda: FusedLayerNorm(8, eps=-1.0)),
        (TypeError, "elementwise_affine", lambda: FusedLayerNorm(8, elementwise_affine="yes")),
        (TypeError, "bias", lambda: FusedLayerNorm(8, bias=None)),
        (TypeError, "x", lambda: norm([1.0] * 8)),
        (ValueError, "x", lambda: norm(torch.randn(3, 4, device=device))),
        (TypeError, "residual", lambda: norm.add_and_norm(torch.randn(3, 8, device=device), [0.0] * 8)),
    ])


def test_transformers_entry_points(device):
    pytest.importorskip("transformers")
    from kernels.integrations import transformers as integration

    module = types.SimpleNamespace(is_causal=True, training=True)
    q = torch.randn(1, 4, 5, 8, device=device)
    kv = torch.randn(1, 2, 5, 8, device=device)

    def call(attention_mask=None, module=module, **options):
        return lambda: integration.decoder_kernels_attention(module, q, kv, kv, attention_mask, **options)

    sizes = {"batch_size": 1, "q_length": 5, "kv_length": 5, "device": device}
    _run([
        (TypeError, "dropout", call(dropout="0.1")),
        (ValueError, "dropout", call(dropout=1.5)),
        (TypeError, "scaling", call(scaling="0.3")),
        (ValueError, "scaling", call(scaling=-0.3)),
        (TypeError, "sliding_window", call(sliding_window=2.5)),
        (ValueError, "sliding_window", call(sliding_window=0)),
        (ValueError, "softcap", call(softcap=30.0)),
        (ValueError, "s_aux", call(s_aux=torch.zeros(4, device=device))),
        (ValueError, "is_causal", call(is_causal=False)),
        (ValueError, "cu_seq_lens_q", call(cu_seq_lens_q=torch.zeros(2, dtype=torch.int32, device=device))),
        (ValueError, "attention_mask", call(attention_mask=torch.zeros(1, 1, 5, 5, device=device))),
        (TypeError, "local_size", lambda: integration.decoder_kernels_mask(local_size=2.5, **sizes)),
        (ValueError, "local_size", lambda: integration.decoder_kernels_mask(local_size=0, **sizes)),
    ])


def test_a_launch_no_tile_rule_matches_names_its_key():
    from kernels.attention import tiles
    from kernels.decode import tiles as decode_tiles

    with pytest.raises(LookupError, match="precision='16bit', head=512, kernel='backward', dropout=False, arch=90"):
        tiles.table_tile("backward", 300, torch.bfloat16, False, 90, True)
    with pytest.raises(LookupError, match="precision='fp32', head=512"):
        decode_tiles.decode_tile(512, torch.float32)
