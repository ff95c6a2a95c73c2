"""gpt/step.py and gpt/throughput.py: the settings gpt-train chooses per device (with the device queries stubbed),
the training step under bf16 autocast with eager and Triton backends, under torch.compile, and with a CPU stand-in
for CUDA-graph capture; the FLOPs MFU counts and the peak-rate table."""

import contextlib
from dataclasses import replace

import pytest
import torch
from conftest import assert_within_error_rule

from gpt import step as gpt_step
from gpt.cli import default_device
from gpt.model import GPT, GPTConfig
from gpt.step import SettingsError, TrainStep, make_optimizer, resolve_settings
from gpt.throughput import PEAK_BF16_FLOPS, flops_per_token, peak_bf16_flops

# The shapes of test_train.py's tiny gpt-train run (a 30-character vocabulary, batch 16): the compiled step below
# and the one gpt-train compiles there are the same graph, so the second compile is a cache hit.
TINY = dict(vocab_size=30, block_size=16, n_embd=16, n_head=2, n_layer=1, dropout=0.0)
BATCH = 16


def batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH, TINY["block_size"])
    return [(torch.randint(TINY["vocab_size"], shape, generator=generator),
             torch.randint(TINY["vocab_size"], shape, generator=generator)) for _ in range(count)]  # fmt: skip


def fields(settings):
    return {name: getattr(settings, name) for name in
            ("attention", "layernorm", "dtype", "compile", "cuda_graphs", "fused_adamw", "tf32")}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Defaults by device


def test_defaults_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = resolve_settings(default_device())
    assert fields(settings) == dict(attention="eager", layernorm="eager", dtype="float32", compile=False,
                                    cuda_graphs=False, fused_adamw=False, tf32=False)  # fmt: skip
    assert settings.reasons["dtype"] == "the default on a CPU"


def test_defaults_on_a_gpu_with_bf16(fake_gpu):
    fake_gpu(bf16=True)
    settings = resolve_settings(default_device())
    assert fields(settings) == dict(attention="triton", layernorm="triton", dtype="bfloat16", compile=False,
                                    cuda_graphs=False, fused_adamw=True, tf32=True)  # fmt: skip
    assert settings.describe() == [
        "backends: attention=triton, layernorm=triton (this package's kernels, the default on a CUDA GPU)",
        "precision: bfloat16 autocast, weights and optimizer state in float32 (the default on a GPU with bf16)",
        "optimizer: AdamW, fused; TF32 matmuls on (the default on CUDA)",
        "step: compile off, CUDA graphs off (not yet measured faster on the NVIDIA H100 80GB HBM3 by bench.train)",
    ]


def test_a_gpu_without_bf16_trains_in_fp16_or_fp32_under_cuda_graphs(fake_gpu):
    fake_gpu(bf16=False)
    assert resolve_settings("cuda").dtype == "float16"
    assert resolve_settings("cuda", cuda_graphs=True).dtype == "float32"
    with pytest.raises(SettingsError, match="--cuda-graphs cannot run with --dtype float16"):
        resolve_settings("cuda", dtype="float16", cuda_graphs=True)


def test_a_card_bench_train_measured_gets_its_fastest_mode(fake_gpu, monkeypatch):
    monkeypatch.setitem(gpt_step.FASTEST_ON_CARD, "NVIDIA H100 80GB HBM3", dict(compile=False, cuda_graphs=True))
    fake_gpu(bf16=True)
    settings = resolve_settings("cuda")
    assert settings.cuda_graphs and not settings.compile
    assert "bench.train measured this fastest on the NVIDIA H100 80GB HBM3" in settings.describe()[-1]
    assert not resolve_settings("cuda", cuda_graphs=False).cuda_graphs  # the flag still decides
    fake_gpu(bf16=False)  # fp16's GradScaler cannot be captured: the measured default gives way
    settings = resolve_settings("cuda")
    assert settings.dtype == "float16" and not settings.cuda_graphs


def test_flags_override_the_defaults(fake_gpu):
    fake_gpu(bf16=True)
    settings = resolve_settings("cuda", attention="sdpa", dtype="float32", compile=True, cuda_graphs=True)
    assert fields(settings) == dict(attention="sdpa", layernorm="triton", dtype="float32", compile=True,
                                    cuda_graphs=True, fused_adamw=True, tf32=True)  # fmt: skip
    assert settings.reasons["backends"].startswith("--attention as requested")
    assert resolve_settings("cpu", dtype="bfloat16", compile=True).dtype == "bfloat16"


def test_cuda_graphs_need_a_gpu():
    with pytest.raises(SettingsError, match="--cuda-graphs needs a CUDA GPU"):
        resolve_settings("cpu", cuda_graphs=True)


# --------------------------------------------------------------------------------------------------
# The step


def steps_of(settings, model, data, optimizer=None):
    """The losses of one TrainStep over `data`, and the step."""
    optimizer = optimizer or make_optimizer(model, 1e-2, settings)
    train_step = TrainStep(model, optimizer, settings, "cpu")
    return [train_step(x, y).item() for x, y in data], train_step


@pytest.mark.parametrize("backend, dtype", [("eager", "bfloat16"), ("triton", "bfloat16"), ("eager", "float16")])
def test_low_precision_autocast_trains_with_float32_weights(backend, dtype):
    """The step's matrix products run in the autocast dtype (Triton's kernels through the interpreter), the loss
    falls, and the weights, their gradients and AdamW's state stay float32."""
    config = {**TINY, "n_embd": 32, "dropout": 0.1}  # head size 16: a size the attention kernels claim
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config, attention=backend, layernorm=backend))
    settings = replace(resolve_settings("cpu"), attention=backend, layernorm=backend, dtype=dtype)
    logits_dtypes = []
    model.lm_head.register_forward_hook(lambda module, inputs, out: logits_dtypes.append(out.dtype))
    x, y = (t[:4] for t in batches(1)[0])
    losses, train_step = steps_of(settings, model, [(x, y)] * 6)
    assert set(logits_dtypes) == {getattr(torch, dtype)}
    assert train_step.scaler.is_enabled() == (dtype == "float16")
    assert losses[-1] < losses[0] - 0.5, losses
    assert {p.dtype for p in model.parameters()} == {p.grad.dtype for p in model.parameters()} == {torch.float32}
    state = [t for s in train_step.optimizer.state.values() for t in s.values() if t.is_floating_point()]
    assert {t.dtype for t in state} == {torch.float32}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_follows_the_eager_trajectory(fresh_dynamo):
    """torch.compile(fullgraph=True) on CPU (Inductor, so eager backends: it cannot run interpreted Triton kernels):
    the losses of 4 steps within the error rule of the eager fp32 losses against a float64 run of the same step."""
    data = batches(4)
    trajectories = {}
    for name, compiled, dtype in [("eager", False, torch.float32), ("compiled", True, torch.float32),
                                  ("float64", False, torch.float64)]:  # fmt: skip
        torch.manual_seed(0)
        model = GPT(GPTConfig(**TINY)).to(dtype)
        model.check_token_ids = False
        settings = resolve_settings("cpu", compile=compiled)
        torch._dynamo.utils.counters.clear()
        losses, train_step = steps_of(settings, model, data)
        trajectories[name] = torch.tensor(losses, dtype=dtype)
        assert train_step.warmup_calls == 1
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled  # one graph, compiled once
    assert_within_error_rule(trajectories["compiled"], trajectories["eager"], trajectories["float64"], name="losses")


def test_cuda_graph_step_replays_every_new_batch(monkeypatch):
    """The CUDA-graph path's bookkeeping, with a CPU stand-in for the two CUDA calls: the side stream is the current
    stream, and the captured 'graph' replays by running the recorded step again on the static batch (gradients
    written afresh, as a captured backward does). The step must then train exactly as the plain step: the warm-up
    steps on their own batches, the capture step and every replay on theirs, dropout drawn anew each time."""

    class RerunOnReplay:
        def __init__(self, train_step):
            self.train_step = train_step

        def replay(self):
            s = self.train_step
            s.optimizer.zero_grad(set_to_none=True)
            s.static_loss = s._update(s.static_x, s.static_y)

    def capture(train_step):
        train_step.optimizer.zero_grad(set_to_none=True)
        return RerunOnReplay(train_step)

    data = batches(8)
    runs = {}
    for graphs in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**TINY, "dropout": 0.2}))
        settings = replace(resolve_settings("cpu"), cuda_graphs=graphs)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # not capturable: nothing is captured here
        with monkeypatch.context() as patch:
            patch.setattr(TrainStep, "_side_stream", lambda self: contextlib.nullcontext())
            patch.setattr(TrainStep, "_capture", capture)
            train_step = TrainStep(model, optimizer, settings, "cpu")
            losses, warming_up = [], []
            for x, y in data:
                losses.append(train_step(x, y).item())
                warming_up.append(train_step.warming_up)
        runs[graphs] = losses, warming_up, model.state_dict()
    assert runs[True][0] == runs[False][0]
    for name, weight in runs[False][2].items():
        torch.testing.assert_close(runs[True][2][name], weight, rtol=0, atol=0, msg=name)
    warmup = gpt_step.GRAPH_WARMUP_STEPS + 1  # the eager steps and the capture
    assert runs[True][1] == [True] * warmup + [False] * (len(data) - warmup)
    assert runs[False][1] == [True] + [False] * (len(data) - 1)


# --------------------------------------------------------------------------------------------------
# What MFU counts


def nanogpt_flops_per_token(config):
    """nanoGPT's estimate_mfu count written out for this model: 6 FLOPs per weight of a matrix product (the
    blocks, the final LayerNorm and lm_head; not the embedding tables) plus 12 * n_layer * n_embd * block_size."""
    C, L, V, T = config.n_embd, config.n_layer, config.vocab_size, config.block_size
    attention = 3 * C * C + C * C + C  # query, key and value (no bias), then the projection
    feed_forward = C * 4 * C + 4 * C + 4 * C * C + C
    per_block = attention + feed_forward + 2 * 2 * C  # two LayerNorms
    weights = L * per_block + 2 * C + C * V + V
    return 6 * weights + 12 * L * C * T


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_flops_per_token_is_nanogpts_count(backend):
    config = GPTConfig(vocab_size=65, attention=backend, layernorm=backend)  # the reference model
    assert flops_per_token(GPT(config)) == nanogpt_flops_per_token(config)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L4", 121), ("NVIDIA L40S", 362), ("NVIDIA A10", 125),
    ("NVIDIA A10G", None), ("NVIDIA L40", None), ("Tesla V100-SXM2-16GB", None), (None, None)])  # fmt: skip
def test_peak_rate_of_known_cards_and_none_for_others(name, tflops):
    assert peak_bf16_flops(name) == (None if tflops is None else tflops * 1e12)


def test_every_peak_pattern_matches_the_name_it_was_written_for():
    """No entry is shadowed by an earlier, broader one."""
    for index, (pattern, peak) in enumerate(PEAK_BF16_FLOPS):
        name = "NVIDIA " + pattern.replace(r"\b", "")
        assert peak_bf16_flops(name) == peak, (index, name)
