"""kernels.integrations.transformers: tiny random-weight Hugging Face models (no download) with
attn_implementation="decoder_kernels" against the same weights under transformers' eager attention, the eager model
in float64 being the reference of the error rule. GPT-2, Llama with grouped-query heads, Qwen2 with a full layer
and a sliding-window layer narrower than the sequences: logits, loss and every gradient, without padding and with
left, right and mixed padding; greedy generation on a left-padded batch; a dynamic and a static cache continued by
several tokens; training-mode dropout; the clear errors for what the kernels cannot compute; apply_fused_norms on
GPT-2, Llama, Qwen2 and Mistral; transformers' probe for the unrelated Hub "kernels" package. Skipped without
transformers (pip install -e ".[transformers]")."""

import copy
import inspect

import pytest
import torch
from conftest import assert_within_error_rule
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    StaticCache,
)
from transformers.masking_utils import (  # noqa: E402
    causal_mask_function,
    chunked_causal_mask_function,
    sliding_window_causal_mask_function,
)

import kernels.integrations.transformers as decoder_kernels  # noqa: E402
from kernels import FusedLayerNorm, FusedRMSNorm  # noqa: E402

SLIDING_WINDOW = 6
CONFIGS = {
    # Layer 1's softmax scale is halved (scale_attn_by_inverse_layer_idx): the model's own scale must be used.
    "gpt2": GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                       scale_attn_by_inverse_layer_idx=True),
    "llama-gqa": LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    # Layer 0 attends to every earlier token, layer 1 to the last SLIDING_WINDOW (itself included).
    "qwen2-sliding": Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1),
}
# The norm swap also runs on Mistral (its attention is Llama's, tested above).
NORM_CONFIGS = {**CONFIGS, "mistral": MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                    max_position_embeddings=64)}
# Left padding per row of a batch of 3: none, a little, most of the row.
LEFT_PADDING = [0, 3, 11]


@pytest.fixture(scope="module", autouse=True)
def registered():
    decoder_kernels.register()


def _models(name, device, **config_changes):
    """(fused, eager, reference): one set of random weights under decoder_kernels, under eager attention, and
    under eager attention in float64; all in eval mode (no dropout)."""
    config = copy.deepcopy(NORM_CONFIGS[name])
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").to(device).eval()
    fused = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=decoder_kernels.NAME)
    fused.to(device).eval().load_state_dict(eager.state_dict())
    return fused, eager, copy.deepcopy(eager).double()


def _batch(device, length=20, left_padding=LEFT_PADDING):
    """Token ids (len(left_padding), length) and their attention mask, 0 on each row's left padding."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (len(left_padding), length), generator=generator)
    mask = torch.ones_like(ids)
    for row, padding in enumerate(left_padding):
        mask[row, :padding] = 0
    return ids.to(device), mask.to(device)


def _cache_keyword(model):
    """The keyword a model's forward takes a cache by: `cache` from transformers 5.24 on, which deprecates the
    `past_key_values` of earlier versions."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _next_token_loss(logits, ids, mask):
    """Cross-entropy of each token's prediction of the next, over the pairs of tokens that are not padding."""
    pairs = (mask[:, :-1] * mask[:, 1:]).bool()
    return F.cross_entropy(logits[:, :-1][pairs], ids[:, 1:][pairs])


def _unpadded_reference(reference, ids, mask):
    """The reference's logits (B, N, vocab) for a padded batch, computed row by row on each row's tokens alone at
    the positions they have in the batch: what padding must not change (0 at padded positions). Eager float64
    cannot run the padded batch itself: the softmax of a padded query, which sees no token, is NaN there (Llama's
    eager path takes the softmax in fp32, where float64's mask value is -inf), and the NaN reaches the tokens."""
    logits = torch.zeros(*ids.shape, reference.config.vocab_size, dtype=torch.float64, device=ids.device)
    for row in range(ids.shape[0]):
        positions = mask[row].nonzero().flatten()
        logits[row, positions] = reference(ids[row, positions][None], position_ids=positions[None],
                                           use_cache=False).logits[0]
    return logits


def _logits_loss_and_gradients(model, ids, mask, row_by_row=False):
    """The logits of the tokens, the loss and every parameter's gradient; row_by_row: through
    `_unpadded_reference` (the float64 model), else on the padded batch."""
    model.zero_grad(set_to_none=True)
    logits = _unpadded_reference(model, ids, mask) if row_by_row else model(ids, attention_mask=mask).logits
    loss = _next_token_loss(logits, ids, mask)
    loss.backward()
    return logits[mask.bool()], loss, {name: p.grad for name, p in model.named_parameters()}


def _assert_logits_loss_and_gradients_match_eager(fused, eager, reference, ids, mask):
    """The tokens' logits, the loss and every gradient of the fused model against the eager one's by the error
    rule, the reference run row by row (`_unpadded_reference`)."""
    fused_logits, fused_loss, fused_grads = _logits_loss_and_gradients(fused, ids, mask)
    eager_logits, eager_loss, eager_grads = _logits_loss_and_gradients(eager, ids, mask)
    logits64, loss64, grads64 = _logits_loss_and_gradients(reference, ids, mask, row_by_row=True)
    assert_within_error_rule(fused_logits, eager_logits, logits64, name="logits")
    assert_within_error_rule(fused_loss, eager_loss, loss64, name="loss")
    for parameter in grads64:
        assert_within_error_rule(fused_grads[parameter], eager_grads[parameter], grads64[parameter],
                                 name=f"grad {parameter}")


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_loss_and_gradients_match_eager(name, padded, device):
    """Padded positions' outputs mean nothing (they see no token) and are left out."""
    fused, eager, reference = _models(name, device)
    ids, mask = _batch(device, left_padding=LEFT_PADDING if padded else [0, 0, 0])
    _assert_logits_loss_and_gradients_match_eager(fused, eager, reference, ids, mask)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-sliding"])
def test_left_padded_greedy_generation_matches_eager(name, device):
    fused, eager, _ = _models(name, device)
    ids, mask = _batch(device, length=10, left_padding=[0, 2, 6])
    options = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    expected = eager.generate(ids, **options)
    assert torch.equal(fused.generate(ids, **options), expected)
    assert torch.equal(fused.generate(ids, cache_implementation="static", **options), expected)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-sliding"])
def test_cache_continued_by_several_tokens(name, static, device):
    """A left-padded prefill longer than the window, then three tokens at once on its cache (Nq = 3 < Nk), then
    one: each step's logits against eager's on the same cache, and the reference's without any cache. A static
    cache hands the layers its whole buffer, unfilled slots included."""
    fused, eager, reference = _models(name, device)
    ids, mask = _batch(device)
    caches = {model: StaticCache(config=model.config, max_cache_len=32) if static else None for model in (fused, eager)}
    for step in (slice(0, 13), slice(13, 16), slice(16, 17)):
        tokens = mask[:, step].bool()
        logits = []
        with torch.no_grad():
            for model in (fused, eager):
                out = model(ids[:, step], attention_mask=mask[:, :step.stop], use_cache=True,
                            **{_cache_keyword(model): caches[model]})
                caches[model] = out.past_key_values
                logits.append(out.logits[tokens])
            logits.append(_unpadded_reference(reference, ids[:, :step.stop], mask[:, :step.stop])[:, step][tokens])
        assert_within_error_rule(*logits, name=f"logits of tokens {step.start} to {step.stop - 1}")


def test_static_cache_without_attention_mask(device):
    """No padding mask at all: the unfilled slots of the static buffer must still be cut off."""
    fused, eager, reference = _models("qwen2-sliding", device)
    ids, _ = _batch(device, left_padding=[0, 0])
    logits = []
    with torch.no_grad():
        for model in (fused, eager):
            cache = StaticCache(config=model.config, max_cache_len=32)
            first = model(ids[:, :12], use_cache=True, **{_cache_keyword(model): cache}).logits
            then = model(ids[:, 12:15], use_cache=True, **{_cache_keyword(model): cache}).logits
            logits.append(torch.cat([first, then], dim=1))
        logits.append(reference(ids[:, :15], use_cache=False).logits)
    assert_within_error_rule(*logits, name="logits")


def test_grouped_query_heads_reach_the_kernel_unrepeated(device, monkeypatch):
    fused, _, _ = _models("llama-gqa", device)
    kv_heads = []
    real_attention = decoder_kernels.attention

    def spy(q, k, v, **options):
        kv_heads.append((q.shape[1], k.shape[1], v.shape[1]))
        return real_attention(q, k, v, **options)

    monkeypatch.setattr(decoder_kernels, "attention", spy)
    ids, _ = _batch(device, length=8, left_padding=[0])
    with torch.no_grad():
        fused(ids)
    config = fused.config
    assert kv_heads == [(config.num_attention_heads, config.num_key_value_heads, config.num_key_value_heads)] * 2


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_training_dropout_is_applied_and_reproducible_under_a_seed(padded, device):
    fused, _, _ = _models("llama-gqa", device, attention_dropout=0.3)
    ids, mask = _batch(device, length=12, left_padding=[0, 3] if padded else [0, 0])
    tokens = mask.bool()

    def logits(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return fused(ids, attention_mask=mask).logits[tokens]

    without_dropout = logits(seed=3)
    fused.train()
    with_dropout = logits(seed=3)
    assert not torch.allclose(with_dropout, without_dropout), "training mode must drop attention weights"
    assert torch.equal(logits(seed=3), with_dropout), "the same seed must drop the same attention weights"
    assert not torch.equal(logits(seed=4), with_dropout), "another seed must drop other attention weights"
    _next_token_loss(fused(ids, attention_mask=mask).logits, ids, mask).backward()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters())


# --------------------------------------------------------------------------------------------------------------
# What the kernels cannot compute: a clear error, never a silently different result


def test_a_4d_float_mask_is_refused(device):
    fused, _, _ = _models("llama-gqa", device)
    ids, _ = _batch(device, length=6, left_padding=[0])
    bias = torch.zeros(1, 1, 6, 6, device=device)
    with pytest.raises(ValueError, match="4D torch.float32 attention mask"):
        fused(ids, attention_mask=bias)


def test_output_attentions_is_refused(device):
    fused, _, _ = _models("gpt2", device)
    ids, _ = _batch(device, length=6, left_padding=[0])
    with pytest.raises(ValueError, match="output_attentions"):
        fused(ids, output_attentions=True)


def test_packed_sequences_are_refused(device):
    """Two sequences packed in one row, told apart by position ids that restart: eager isolates them, so must we."""
    fused, _, _ = _models("llama-gqa", device)
    ids, _ = _batch(device, length=8, left_padding=[0])
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]], device=device)
    with pytest.raises(ValueError, match="other than the causal one"):
        fused(ids, position_ids=position_ids, use_cache=False)  # with a cache, eager would not isolate them


def _mask_sizes(device, length=8):
    return {"batch_size": 2, "q_length": length, "kv_length": length, "device": device}


@pytest.mark.parametrize("mask_function, window, expected", [
    (chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long)), None, "other than the causal one"),
    (sliding_window_causal_mask_function(3), None, "other than the causal one"),
    (causal_mask_function, 3, "other than the causal within a sliding window of 3"),
    (sliding_window_causal_mask_function(4), 3, "other than the causal within a sliding window of 3"),
], ids=["chunked", "window-on-a-full-layer", "no-window-on-a-sliding-layer", "another-window"])
def test_mask_patterns_other_than_the_kernels_are_refused(mask_function, window, expected, device):
    with pytest.raises(ValueError, match=expected):
        decoder_kernels.decoder_kernels_mask(mask_function=mask_function, local_size=window, **_mask_sizes(device))


def test_the_kernels_patterns_give_the_padding_or_none(device):
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8], dtype=torch.bool, device=device)
    sliding = sliding_window_causal_mask_function(3)
    assert decoder_kernels.decoder_kernels_mask(**_mask_sizes(device)) is None
    assert decoder_kernels.decoder_kernels_mask(mask_function=sliding, local_size=3, **_mask_sizes(device)) is None
    assert torch.equal(decoder_kernels.decoder_kernels_mask(attention_mask=padding, **_mask_sizes(device)), padding)
    # A static cache's buffer of 8 holding 5 tokens, the last 2 of them the queries: 3 unfilled slots cut off.
    static = {**_mask_sizes(device), "q_length": 2, "q_offset": torch.tensor(3, device=device)}
    assert torch.equal(decoder_kernels.decoder_kernels_mask(**static), torch.ones(2, 5, dtype=torch.bool,
                                                                                    device=device))


def test_padding_between_tokens_under_a_sliding_window_is_refused(device):
    gap = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1], [1] * 8], dtype=torch.bool, device=device)
    sliding = {"mask_function": sliding_window_causal_mask_function(3), "local_size": 3, **_mask_sizes(device)}
    with pytest.raises(ValueError, match="sliding window with padding between"):
        decoder_kernels.decoder_kernels_mask(attention_mask=gap, **sliding)
    assert torch.equal(decoder_kernels.decoder_kernels_mask(attention_mask=gap, **_mask_sizes(device)), gap)


@pytest.mark.parametrize("argument, expected", [
    ({"softcap": 30.0}, "softcap"),
    ({"s_aux": torch.zeros(2)}, "sinks"),
    ({"is_causal": False}, "not causal"),
    ({"cu_seq_lens_q": torch.zeros(2, dtype=torch.int32)}, "padding-free"),
])
def test_attention_arguments_the_kernels_cannot_honour_are_refused(argument, expected, device):
    fused, _, _ = _models("llama-gqa", device)
    attention_module = fused.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 8, device=device)
    kv = torch.randn(1, 2, 5, 8, device=device)
    with pytest.raises(ValueError, match=expected):
        decoder_kernels.decoder_kernels_attention(attention_module, q, kv, kv, None, **argument)


def test_transformers_does_not_mistake_this_package_for_the_hub_kernels_package():
    """transformers imports the Hub's "kernels" package when is_kernels_available(); ours is also imported as
    `kernels`, and must not pass for it."""
    from transformers.integrations import hub_kernels
    from transformers.utils.import_utils import is_kernels_available

    assert not is_kernels_available()
    assert not hasattr(hub_kernels, "get_kernel_hub")  # bound only when transformers believes the Hub package is there


# (left, right) padding of each row of a batch of 3: right padding, as training batches have it; and rows padded on
# both sides beside a left-padded and a right-padded one. Every row keeps more tokens than the sliding window.
RIGHT_PADDING = [(0, 0), (0, 3), (0, 11)]
MIXED_PADDING = [(2, 5), (0, 7), (6, 0)]


@pytest.mark.parametrize("padding", [RIGHT_PADDING, MIXED_PADDING], ids=["right-padded", "mixed-padding"])
@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-sliding"])
def test_right_and_mixed_padding_match_eager(name, padding, device):
    """Padding at a row's end, and at both ends, under a full layer and a sliding-window layer: logits, loss and
    every gradient, padded positions left out (a right-padded position sees the tokens before it in eager, none
    here: it is padding either way)."""
    fused, eager, reference = _models(name, device)
    ids, _ = _batch(device, left_padding=[0] * len(padding))
    mask = torch.ones_like(ids)
    for row, (left, right) in enumerate(padding):
        mask[row, :left] = 0
        mask[row, mask.shape[1] - right:] = 0
    _assert_logits_loss_and_gradients_match_eager(fused, eager, reference, ids, mask)


# --------------------------------------------------------------------------------------------------------------
# The norm swap


def _norms(model):
    return {path: module for path, module in model.named_modules() if "Norm" in type(module).__name__}


@pytest.mark.parametrize("name", NORM_CONFIGS)
def test_fused_norms_match_eager(name, device):
    """apply_fused_norms on a model whose attention already runs on the kernels: every norm swapped, on its own
    Parameters; logits, loss and every gradient against eager."""
    fused, eager, reference = _models(name, device)
    norms = _norms(fused)
    assert len(norms) == 2 * fused.config.num_hidden_layers + 1  # two per layer and the final one
    assert decoder_kernels.apply_fused_norms(fused) is fused
    swapped = _norms(fused)
    assert swapped.keys() == norms.keys()
    for path, module in swapped.items():
        assert type(module) is (FusedLayerNorm if name == "gpt2" else FusedRMSNorm), path
        assert all(new is old for new, old in zip(module.parameters(), norms[path].parameters(), strict=True)), path
    _assert_logits_loss_and_gradients_match_eager(fused, eager, reference, *_batch(device, left_padding=[0, 0, 0]))


def test_fused_norms_keep_the_training_mode_and_a_second_call_changes_nothing(device):
    fused, _, _ = _models("llama-gqa", device)
    fused.train()
    decoder_kernels.apply_fused_norms(fused)
    norms = _norms(fused)
    assert all(module.training for module in norms.values())
    decoder_kernels.apply_fused_norms(fused)
    assert all(module is norms[path] for path, module in _norms(fused).items())


def test_norms_the_swap_cannot_replace_exactly_are_refused_and_nothing_is_swapped():
    gemma = AutoModelForCausalLM.from_config(GemmaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match=r"cannot replace model.layers.0.input_layernorm \(.*GemmaRMSNorm\)"):
        decoder_kernels.apply_fused_norms(gemma)
    two_dimensional = torch.nn.ModuleDict({"first": torch.nn.LayerNorm(8), "second": torch.nn.LayerNorm((2, 8))})
    with pytest.raises(ValueError, match=r"cannot replace second \(torch.nn.modules.normalization.LayerNorm\)"):
        decoder_kernels.apply_fused_norms(two_dimensional)
    assert type(two_dimensional["first"]) is torch.nn.LayerNorm
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        decoder_kernels.apply_fused_norms("gpt2")
