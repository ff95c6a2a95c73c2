"""Generation with a key/value cache (gpt/cache.py) against recomputing the context for every token: the same
tokens, greedy and seeded, on every attention backend, within block_size and past it; each cached step's logits by
the float64 error rule; the Triton backend's steps run the split-KV decode kernel."""

import pytest
import torch
from conftest import assert_within_error_rule

import kernels
from gpt.cache import KVCache
from gpt.model import GPT, GPTConfig

TINY = dict(vocab_size=19, block_size=16, n_embd=32, n_head=4, n_layer=2, dropout=0.0)
BACKENDS = ["eager", "sdpa", "triton"]


def tiny_model(device, backend, dtype=torch.float32):
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY, attention=backend)).to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prompt, new_tokens", [(5, 8), (3, 16)], ids=["within-block", "past-block"])
def test_cached_generation_gives_the_recomputed_tokens(device, backend, prompt, new_tokens):
    """Greedy (top_k=1) and seeded sampling draw the same tokens with the cache as without, also once the context
    outgrows block_size (3 + 16 > 16) and the cache is rebuilt for every token. float64 on eager and sdpa, so the
    tokens cannot differ by rounding; the kernels run in fp32."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    model = tiny_model(device, backend, dtype)
    idx = torch.randint(0, TINY["vocab_size"], (2, prompt), generator=torch.Generator().manual_seed(1)).to(device)
    greedy = [model.generate(idx, new_tokens, top_k=1, use_cache=use_cache) for use_cache in (False, True)]
    assert torch.equal(greedy[0], greedy[1])
    sampled = [model.generate(idx, new_tokens, top_k=5, generator=torch.Generator(device=device).manual_seed(2),
                              use_cache=use_cache) for use_cache in (False, True)]
    assert torch.equal(sampled[0], sampled[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_cached_step_matches_the_recomputed_logits(device, backend):
    """Prefill 6 tokens, then step one token at a time up to block_size: every step's logits against the float64
    eager model run on the whole context, by the error rule against the uncached model in fp32."""
    model = tiny_model(device, backend)
    reference = tiny_model(device, "eager", torch.float64)
    tokens = torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]), generator=torch.Generator().manual_seed(3))
    tokens = tokens.to(device)
    cache = KVCache.for_model(model.config)
    with torch.no_grad():
        model(tokens[:, :6], cache=cache)
        for end in range(7, TINY["block_size"] + 1):
            cached = model(tokens[:, end - 1 : end], cache=cache)[0][:, -1]
            recomputed = model(tokens[:, :end])[0][:, -1]
            exact = reference(tokens[:, :end])[0][:, -1]
            assert_within_error_rule(cached, recomputed, exact, name=f"logits after {end} tokens")
    assert cache.length == TINY["block_size"]


def test_the_triton_backend_steps_through_the_decode_kernel(device, monkeypatch):
    """Each cached step of the Triton backend runs kernels.decode_attention once per layer (a backend that quietly
    recomputed the context would pass the token tests)."""
    import kernels.modules

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[3])  # the cached length
        return kernels.decode_attention(*args, **kwargs)

    monkeypatch.setattr(kernels.modules, "decode_attention", counting)
    model = tiny_model(device, "triton")
    idx = torch.randint(0, TINY["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(4)).to(device)
    model.generate(idx, 3, top_k=1)
    assert calls == [4, 4, 5, 5]  # two steps after the prefill, two layers each


def test_a_cache_continues_where_it_stopped_and_refuses_to_overflow(device):
    model = tiny_model(device, "eager")
    cache = KVCache.for_model(model.config)
    tokens = torch.randint(0, TINY["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        model(tokens[:, :10], cache=cache)
        assert cache.length == 10 and cache.keys[0].shape == (1, 4, 16, 8)
        with pytest.raises(ValueError, match=r"block_size \(16\) after the 10 cached tokens"):
            model(tokens, cache=cache)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cache_continued_by_several_tokens_at_once_matches_the_recomputed_logits(device, backend):
    """A prefill of 5 tokens, then 3, 1, 17 and 6 new tokens per call up to block_size (32): every new token's
    logits against the float64 eager model run on the whole context, by the error rule against the uncached model
    in fp32. With one token per call a causal mask misaligned among the new tokens is invisible; on the Triton
    backend 3, 1 and 6 tokens run the decode kernel (Nq > 1 against the cache) and 17 the attention kernel
    (Nq = 17 < Nk = 26, causal bottom-right)."""
    config = dict(TINY, block_size=32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config, attention=backend)).to(device).eval()
    reference = GPT(GPTConfig(**config)).to(device).double().eval()
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, TINY["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(6)).to(device)
    cache = KVCache.for_model(model.config)
    with torch.no_grad():
        model(tokens[:, :5], cache=cache)
        start = 5
        for new_tokens in (3, 1, 17, 6):
            end = start + new_tokens
            cached = model(tokens[:, start:end], cache=cache)[0]
            recomputed = model(tokens[:, :end])[0][:, start:]
            exact = reference(tokens[:, :end])[0][:, start:]
            assert_within_error_rule(cached, recomputed, exact, name=f"logits of tokens {start} to {end - 1}")
            start = end
    assert cache.length == 32
