"""The GPT with the fused attention module matches the eager GPT on the same weights: logits and every
parameter's gradient; checkpoints move between backends (the seed's too); the sdpa backend matches too."""

import pytest
import torch
from conftest import assert_gpt_within_error_rule

from gpt.model import GPT, GPTConfig
from kernels import FusedMultiHeadAttention

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

TINY = dict(vocab_size=13, block_size=16, n_embd=32, n_head=2, n_layer=2, dropout=0.0)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_fused_gpt_matches_eager_logits_and_every_gradient(device, backend):
    torch.manual_seed(0)
    eager = GPT(GPTConfig(**TINY)).to(device)
    fused = GPT(GPTConfig(**TINY, attention=backend)).to(device)
    fused.load_state_dict(eager.state_dict())
    idx = torch.randint(0, TINY["vocab_size"], (2, 13), device=device)  # T = 13 < block_size: a ragged tail
    targets = torch.randint(0, TINY["vocab_size"], (2, 13), device=device)
    assert_gpt_within_error_rule(fused, eager, idx, targets)


def test_state_dict_moves_both_ways(device):
    torch.manual_seed(1)
    eager = GPT(GPTConfig(**TINY)).to(device)
    fused = GPT(GPTConfig(**TINY, attention="triton")).to(device)
    assert {k: v.shape for k, v in eager.state_dict().items()} == {k: v.shape for k, v in fused.state_dict().items()}
    idx = torch.randint(0, TINY["vocab_size"], (1, 16), device=device)
    fused.load_state_dict(eager.state_dict())  # eager checkpoint -> fused model
    torch.testing.assert_close(fused(idx)[0], eager(idx)[0])
    trained = GPT(GPTConfig(**TINY, attention="triton")).to(device)
    eager.load_state_dict(trained.state_dict())  # fused checkpoint -> eager model
    torch.testing.assert_close(eager(idx)[0], trained(idx)[0])


def test_module_with_dropout_trains_and_is_reproducible(device):
    torch.manual_seed(2)
    module = FusedMultiHeadAttention(32, 2, dropout=0.3).to(device)
    x = torch.randn(2, 11, 32, device=device, requires_grad=True)
    torch.manual_seed(3)
    first = module(x)
    first.sum().backward()
    torch.manual_seed(3)
    assert torch.equal(module(x), first)
    assert torch.isfinite(x.grad).all()
    module.eval()
    assert torch.equal(module(x), module(x))  # no dropout in eval mode


def test_module_applies_its_attention_dropout(device):
    """With the output dropout off, train mode differs from eval mode, and equals the eager per-head math with the
    kernel's own dropout mask on the attention weights (a module that never passed dropout_p to the kernel, or
    dropped the wrong tensor, fails)."""
    from kernels import attention_dropout_mask
    from kernels.reference import attention_reference

    torch.manual_seed(4)
    module = FusedMultiHeadAttention(32, 2, dropout=0.4).to(device)
    module.dropout = torch.nn.Identity()  # only the attention-weight dropout remains
    x = torch.randn(2, 11, 32, device=device)
    torch.manual_seed(5)
    trained = module.train()(x)
    evaluated = module.eval()(x)
    assert not torch.allclose(trained, evaluated)
    q, k, v = module.qkv(x).view(2, 11, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    torch.manual_seed(5)  # the module's call drew its seed right after this point: draw the same one
    keep = attention_dropout_mask(q, k, 0.4)
    weights = attention_reference(q, k, v, causal=True, keep=keep, dropout_p=0.4)
    expected = module.proj(weights.transpose(1, 2).reshape(2, 11, 32))
    torch.testing.assert_close(trained, expected, rtol=1e-4, atol=1e-5)


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="divisible"):
        FusedMultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="backend"):
        FusedMultiHeadAttention(32, 2, backend="flash")
    with pytest.raises(ValueError, match="dropout"):
        FusedMultiHeadAttention(32, 2, dropout=1.0)


@pytest.mark.parametrize("backend", ["eager", "triton", "sdpa"])
def test_the_seeds_checkpoints_load_their_saved_masks_ignored(device, backend):
    """The seed's gpt.py registered each head's causal mask as a persistent buffer, so its state dicts hold
    `blocks.{i}.sa.heads.{j}.tril` beside the same parameters as ours."""
    torch.manual_seed(4)
    eager = GPT(GPTConfig(**TINY)).to(device).eval()
    seed_state = dict(eager.state_dict())
    block_size = TINY["block_size"]
    for layer in range(TINY["n_layer"]):
        for head in range(TINY["n_head"]):
            seed_state[f"blocks.{layer}.sa.heads.{head}.tril"] = torch.tril(torch.ones(block_size, block_size))
    model = GPT(GPTConfig(**TINY, attention=backend)).to(device).eval()
    model.load_state_dict(seed_state)  # strict
    assert "blocks.0.sa.heads.0.tril" in seed_state, "the caller's state dict is left as it was"
    idx = torch.randint(0, TINY["vocab_size"], (2, 9), device=device)
    torch.testing.assert_close(model(idx)[0], eager(idx)[0])
    with pytest.raises(RuntimeError, match=r"Unexpected key.*blocks\.0\.sa\.tril"):
        model.load_state_dict({**seed_state, "blocks.0.sa.tril": seed_state["blocks.0.sa.heads.0.tril"]})
