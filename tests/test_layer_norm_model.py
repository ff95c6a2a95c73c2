"""The GPT with the fused LayerNorm (alone, and with the fused attention too) against the eager GPT on
the same weights: logits and every parameter's gradient, and checkpoints moving both ways."""

import pytest
import torch
from conftest import assert_gpt_within_error_rule

from gpt.model import GPT, GPTConfig
from kernels import FusedLayerNorm

pytestmark = pytest.mark.usefixtures("poisoned_allocations")

TINY = dict(vocab_size=19, block_size=16, n_embd=32, n_head=4, n_layer=2, dropout=0.0)


def _batch(device, generator):
    idx = torch.randint(0, TINY["vocab_size"], (3, 11), generator=generator).to(device)
    targets = torch.randint(0, TINY["vocab_size"], (3, 11), generator=generator).to(device)
    return idx, targets


@pytest.mark.parametrize("attention", ["eager", "triton"])
def test_fused_layernorm_gpt_matches_eager(device, attention):
    generator = torch.Generator().manual_seed(0)
    eager = GPT(GPTConfig(**TINY)).to(device)
    # Non-trivial norm parameters, so a swapped weight and bias would show.
    with torch.no_grad():
        for name, parameter in eager.named_parameters():
            if name.split(".")[-2].startswith("ln"):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator).to(device))
    fused = GPT(GPTConfig(**TINY, layernorm="triton", attention=attention)).to(device)
    fused.load_state_dict(eager.state_dict())
    assert all(isinstance(m, FusedLayerNorm) for m in (fused.ln_f, fused.blocks[0].ln1, fused.blocks[0].ln2))
    assert_gpt_within_error_rule(fused, eager, *_batch(device, generator))


def test_fused_gpt_under_autocast_matches_eager_under_autocast(device):
    """Mixed precision as training runs it: 16-bit attention and feed-forward outputs added to the fp32
    residual stream, the norms in fp32 (torch.autocast's rule for layer_norm). fp16, which CPU autocast and
    the interpreter handle too. The weights are seeded: in fp16 a ReLU whose input lies within rounding of 0 opens
    in one model and not the other, a jump no error rule absorbs, and one draw of the weights in about seven puts
    such an input in the way."""
    generator = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    eager = GPT(GPTConfig(**TINY)).to(device)
    fused = GPT(GPTConfig(**TINY, layernorm="triton", attention="triton")).to(device)
    fused.load_state_dict(eager.state_dict())
    assert_gpt_within_error_rule(fused, eager, *_batch(device, generator), autocast_dtype=torch.float16)


def test_checkpoints_move_both_ways(device):
    generator = torch.Generator().manual_seed(1)
    fused = GPT(GPTConfig(**TINY, layernorm="triton")).to(device)
    with torch.no_grad():
        for parameter in fused.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator).to(device))
    eager = GPT(GPTConfig(**TINY)).to(device)
    eager.load_state_dict(fused.state_dict())  # trained fused, loaded eager (strict: the same keys)
    round_trip = GPT(GPTConfig(**TINY, layernorm="triton")).to(device)
    round_trip.load_state_dict(eager.state_dict())

    idx, _ = _batch(device, generator)
    with torch.no_grad():
        fused_logits, eager_logits, round_trip_logits = (m.eval()(idx)[0] for m in (fused, eager, round_trip))
    torch.testing.assert_close(fused_logits, eager_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(round_trip_logits, fused_logits, rtol=0, atol=0)


def test_blocks_fuse_the_residual_add_into_ln2(device, monkeypatch):
    calls = []
    real_add_and_norm = FusedLayerNorm.add_and_norm
    monkeypatch.setattr(FusedLayerNorm, "add_and_norm", lambda *a: calls.append(1) or real_add_and_norm(*a))
    idx, _ = _batch(device, torch.Generator().manual_seed(3))
    GPT(GPTConfig(**TINY, layernorm="triton")).to(device)(idx)
    assert len(calls) == TINY["n_layer"]  # one fused add + ln2 per block
