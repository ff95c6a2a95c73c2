"""The eager GPT: shapes, the Block's residual pre-norm formula, the per-head design's parameter count, initial
loss, causality, dropout, generation past block_size, and a clear error for every bad input."""

import math

import pytest
import torch

from gpt.model import GPT, Block, GPTConfig

VOCAB = 11


def tiny_config(**overrides):
    return GPTConfig(**{"vocab_size": VOCAB, "block_size": 8, "n_embd": 16, "n_head": 4, "n_layer": 2,
                        "dropout": 0.0, **overrides})  # fmt: skip


def tiny_model(device, **overrides):
    torch.manual_seed(0)
    return GPT(tiny_config(**overrides)).to(device)


def random_ids(device, batch=3, time=8, vocab=VOCAB):
    return torch.randint(vocab, (batch, time), device=device)


@pytest.mark.parametrize("T", [1, 5, 8])
def test_shapes(device, T):
    model = tiny_model(device)
    idx, targets = random_ids(device, time=T), random_ids(device, time=T)
    logits, loss = model(idx)
    assert logits.shape == (3, T, VOCAB) and loss is None
    logits, loss = model(idx, targets)
    assert logits.shape == (3, T, VOCAB) and loss.shape == () and torch.isfinite(loss)


def per_head_design_parameters(vocab_size, block_size, n_embd, n_head, n_layer):
    """Count by hand: n_head heads of size n_embd // n_head, each with bias-free key, query and value."""
    C, hs = n_embd, n_embd // n_head
    layer_norm = 2 * C
    attention = n_head * 3 * C * hs + (C * C + C)  # heads, then the output projection with bias
    feed_forward = (C * 4 * C + 4 * C) + (4 * C * C + C)
    block = 2 * layer_norm + attention + feed_forward
    embeddings = vocab_size * C + block_size * C
    return embeddings + n_layer * block + layer_norm + (C * vocab_size + vocab_size)


def test_parameter_count_of_the_reference_design():
    model = GPT(GPTConfig(vocab_size=65))  # block 256, n_embd 384, 6 heads, 6 layers
    assert model.num_parameters() == per_head_design_parameters(65, 256, 384, 6, 6) == 10_788_929


def test_parameter_count_of_a_small_design():
    model = GPT(tiny_config(n_embd=24, n_head=3, n_layer=3))
    assert model.num_parameters() == per_head_design_parameters(VOCAB, 8, 24, 3, 3)


def test_block_is_pre_norm_with_both_residuals(device):
    """The seed's Block, written out from the block's own modules: x + sa(ln1(x)), then + ffwd(ln2(.))."""
    torch.manual_seed(0)
    block = Block(tiny_config()).to(device).eval()
    x = torch.randn(2, 8, 16, device=device)
    h = x + block.sa(block.ln1(x))
    torch.testing.assert_close(block(x), h + block.ffwd(block.ln2(h)))


def test_initial_loss_is_near_uniform(device):
    vocab = 65
    model = tiny_model(device, vocab_size=vocab)
    _, loss = model(random_ids(device, batch=16, vocab=vocab), random_ids(device, batch=16, vocab=vocab))
    assert abs(loss.item() - math.log(vocab)) < 0.05


@pytest.mark.parametrize("changed", [0, 3, 7])
def test_causality(device, changed):
    model = tiny_model(device).eval()
    idx = random_ids(device)
    altered = idx.clone()
    altered[:, changed] = (altered[:, changed] + 1) % VOCAB
    before, _ = model(idx)
    after, _ = model(altered)
    torch.testing.assert_close(after[:, :changed], before[:, :changed], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, changed:], before[:, changed:])  # the change is visible from there on


def test_dropout_active_in_train_mode_only(device):
    model = tiny_model(device, dropout=0.5)
    idx = random_ids(device)
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_no_dropout_means_deterministic_training_forward(device):
    model = tiny_model(device).train()
    idx = random_ids(device)
    torch.testing.assert_close(model(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_generation_runs_past_block_size(device):
    model = tiny_model(device).eval()
    start = random_ids(device, batch=2, time=3)
    out = model.generate(start, max_new_tokens=3 * model.config.block_size)
    assert out.shape == (2, 3 + 3 * model.config.block_size)
    assert torch.equal(out[:, :3], start)
    assert out.min() >= 0 and out.max() < VOCAB


def test_generation_with_top_k_1_is_greedy(device):
    model = tiny_model(device).eval()
    idx = random_ids(device, batch=2, time=2)
    out = model.generate(idx, max_new_tokens=12, top_k=1, temperature=0.7)
    for _ in range(12):
        logits, _ = model(idx[:, -model.config.block_size :])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)


def test_generation_with_top_k_3_draws_among_the_top_3(device):
    """Many draws of the next token after one context: each among the model's 3 most likely tokens, and not
    always the same one (a top-k that kept only the largest logit would be greedy)."""
    model = tiny_model(device).eval()
    context = random_ids(device, batch=1, time=4)
    logits, _ = model(context)
    top_3 = set(logits[0, -1].topk(3).indices.tolist())
    generator = torch.Generator(device=device).manual_seed(0)
    drawn = model.generate(context.expand(300, -1), max_new_tokens=1, top_k=3, generator=generator)[:, -1]
    assert set(drawn.tolist()) <= top_3
    assert len(set(drawn.tolist())) > 1


def test_generation_is_reproducible_with_a_generator(device):
    model = tiny_model(device).eval()
    idx = random_ids(device, batch=1, time=1)
    first = model.generate(idx, 20, generator=torch.Generator(device=device).manual_seed(3))
    second = model.generate(idx, 20, generator=torch.Generator(device=device).manual_seed(3))
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    "make_input, error, match",
    [
        (lambda d: torch.full((2, 4), VOCAB, device=d), ValueError, "token ids must lie"),
        (lambda d: torch.full((2, 4), -1, device=d), ValueError, "token ids must lie"),
        (lambda d: torch.zeros(2, 9, dtype=torch.long, device=d), ValueError, "block_size"),
        (lambda d: torch.zeros(2, 0, dtype=torch.long, device=d), ValueError, "block_size"),
        (lambda d: torch.zeros(2, 4, device=d), TypeError, "int64 or int32"),
        (lambda d: [[1, 2, 3]], TypeError, "int64 or int32"),
        (lambda d: torch.zeros(4, dtype=torch.long, device=d), ValueError, r"shape \(batch, time\)"),
    ],
    ids=["id-too-large", "negative-id", "longer-than-block", "empty", "float-idx", "list-idx", "1d-idx"],
)
def test_bad_idx(device, make_input, error, match):
    model = tiny_model(device)
    with pytest.raises(error, match=match):
        model(make_input(device))


@pytest.mark.parametrize(
    "make_targets, error, match",
    [
        (lambda d: torch.zeros(3, 8, device=d), TypeError, "targets must be a tensor of int64"),
        (lambda d: torch.zeros(3, 7, dtype=torch.long, device=d), ValueError, "must match idx"),
        (lambda d: torch.full((3, 8), VOCAB, device=d), ValueError, "targets must lie"),
    ],
    ids=["float-targets", "wrong-shape", "target-out-of-range"],
)
def test_bad_targets(device, make_targets, error, match):
    model = tiny_model(device)
    with pytest.raises(error, match=match):
        model(random_ids(device), make_targets(device))


def test_int32_ids_work_like_int64(device):
    model = tiny_model(device)
    idx, targets = random_ids(device), random_ids(device)
    logits64, loss64 = model(idx, targets)
    logits32, loss32 = model(idx.int(), targets.int())
    torch.testing.assert_close(logits32, logits64, rtol=0, atol=0)
    torch.testing.assert_close(loss32, loss64, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"attention": "flash"}, "unknown attention backend"),
        ({"layernorm": "apex"}, "unknown layernorm backend"),
        ({"n_embd": 18, "n_head": 4}, "divisible"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_head": 0}, "n_head must be at least 1"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


@pytest.mark.parametrize("kwargs, match", [({"temperature": 0.0}, "temperature"), ({"top_k": 0}, "top_k")])
def test_bad_generation_arguments(device, kwargs, match):
    model = tiny_model(device)
    with pytest.raises(ValueError, match=match):
        model.generate(random_ids(device, batch=1, time=2), 3, **kwargs)


def test_the_token_id_check_can_be_turned_off_and_gpt_train_does(device, tmp_path):
    """The range check costs a device synchronisation per forward on a GPU (and none may happen inside a CUDA
    graph): a caller whose ids come from its own tokenizer turns it off, as gpt-train does."""
    from gpt.train import parse_args, train

    model = tiny_model(device)
    model.check_token_ids = False
    model(random_ids(device))  # in range: runs, with no check
    data = tmp_path / "input.txt"
    data.write_text("abcd" * 50, encoding="utf-8")
    trained = train(parse_args(["--data", str(data), "--out-dir", str(tmp_path / "out"), "--device", "cpu",
                                "--n-embd", "8", "--n-head", "2", "--n-layer", "1", "--block-size", "8",
                                "--batch-size", "2", "--max-iters", "1", "--eval-iters", "1", "--sample-tokens", "1"]))
    assert trained["model"].check_token_ids is False
