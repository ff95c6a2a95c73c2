"""The GPT with the fused LayerNorm (alone, and with the fused attention too) against the eager GPT on
the same weights: logits and every parameter's gradient, checkpoints moving both ways, and a training Block's
attention-output dropout fused into its add + ln2 against the eager Block given the same mask."""

import copy

import pytest
import torch
from conftest import assert_gpt_within_error_rule, assert_within_error_rule

from gpt.model import GPT, Block, GPTConfig
from kernels import FusedLayerNorm, add_norm_dropout_mask

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
    monkeypatch.setattr(FusedLayerNorm, "add_and_norm", lambda *a, **k: calls.append(1) or real_add_and_norm(*a, **k))
    idx, _ = _batch(device, torch.Generator().manual_seed(3))
    GPT(GPTConfig(**TINY, layernorm="triton")).to(device)(idx)
    assert len(calls) == TINY["n_layer"]  # one fused add + ln2 per block


class _GivenMask(torch.nn.Module):
    """Dropout that applies a given keep-mask: the eager Block's projection dropout made to drop what the fused
    Block's kernel dropped."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.to(x.dtype) / (1 - self.p)


@pytest.mark.parametrize("attention", ["eager", "triton"])
def test_training_block_fuses_the_projection_dropout_and_matches_eager_given_the_same_mask(device, attention):
    """A training Block with the Triton norm drops the attention output inside add_layer_norm (its dropout module
    never runs); given the mask the kernel drew (add_norm_dropout_mask, after the same torch.manual_seed), the
    eager Block gives the same output and every gradient, by the error rule against float64. The attention
    weights' and the feed-forward's dropout are switched off, so that the projection's is the only one."""
    config = dict(TINY, dropout=0.3)
    torch.manual_seed(0)
    eager = Block(GPTConfig(**config)).to(device).train()
    fused = Block(GPTConfig(**config, layernorm="triton", attention=attention)).to(device).train()
    fused.load_state_dict(eager.state_dict())
    for block in (eager, fused):
        block.ffwd.eval()
        if hasattr(block.sa, "heads"):
            block.sa.heads.eval()
        else:
            block.sa.attention_dropout = 0.0
    fused.sa.dropout.forward = None  # the fused Block must not call it
    x = torch.randn(3, 11, TINY["n_embd"], device=device)
    grad = torch.randn_like(x)
    torch.manual_seed(4)
    keep = add_norm_dropout_mask(x, 0.3)
    assert not keep.all()
    eager.sa.dropout = _GivenMask(keep, 0.3)
    reference = copy.deepcopy(eager).double()

    # every parameter both Blocks name alike (the fused attention packs the heads' query, key and value weights)
    shared = sorted(set(dict(eager.named_parameters())) & set(dict(fused.named_parameters())))

    def run(block, dtype):
        block.zero_grad(set_to_none=True)
        inputs = x.to(dtype).clone().requires_grad_()
        torch.manual_seed(4)  # the fused Block's add + ln2 draws the seed the helper drew
        out = block(inputs)
        out.backward(grad.to(dtype))
        return [out, inputs.grad] + [block.get_parameter(name).grad for name in shared]

    names = ["output", "grad x"] + [f"grad {name}" for name in shared]
    for name, f, e, r in zip(names, run(fused, torch.float32), run(eager, torch.float32),
                             run(reference, torch.float64), strict=True):
        assert_within_error_rule(f, e, r, name=name)
