"""The headline shapes under pytest-benchmark: `pytest bench --benchmark-only`. Skipped without a CUDA GPU.

Attention at the goals' headline (bf16, causal, head size 128, 4096 tokens, B*N = 16k, H*D = 2048) and at the
decoder's own shape (batch 64, 6 heads, 256 tokens, head size 64); LayerNorm and add+LayerNorm at 4096 x 4096 bf16;
one GPT training step at the reference config. Each output is checked against the reference before it is timed.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="benchmarks need a CUDA GPU and none is visible (torch.cuda.is_available() is False)",
)

ATTENTION_SHAPES = {"headline-bf16-causal-D128-N4096": (4, 16, 4096, 128), "decoder-B64-H6-N256-D64": (64, 6, 256, 64)}


def _synchronized(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


def _time(benchmark, fn, rounds=30):
    benchmark.pedantic(_synchronized(fn), rounds=rounds, warmup_rounds=5)
    return benchmark.stats.stats.median  # seconds


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["triton", "sdpa-flash", "sdpa-cudnn"])
@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES), ids=list(ATTENTION_SHAPES))
def test_attention(benchmark, shape, provider, mode):
    from bench import attention

    fn = attention.providers()[provider][0]
    b, h, n, d = ATTENTION_SHAPES[shape]
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    try:
        attention.check_provider(fn, q, k, v, dout, True, attention.reference_slices(q, k, v, dout, True),
                                 torch.bfloat16)
    except RuntimeError as exc:  # an SDPA backend this card or build lacks
        pytest.skip(f"{provider} cannot run here: {str(exc).splitlines()[0]}")
    step = (lambda: fn(q, k, v, True)) if mode == "fwd" else (lambda: fn(q, k, v, True).backward(dout))
    seconds = _time(benchmark, step)
    benchmark.extra_info["tflops"] = attention.attention_flops(b, h, n, n, d, True, mode) / seconds / 1e12


@pytest.mark.parametrize("provider", ["triton", "torch"])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_layernorm_forward(benchmark, op, provider):
    from bench import layernorm

    name = provider if op == "layer_norm" or provider == "triton" else "add-then-norm"
    fn = layernorm.providers()[op][name][0]
    rows, width = 4096, 4096
    x, residual = (torch.randn(rows, width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight, bias = torch.randn(width, device="cuda", dtype=torch.bfloat16), torch.randn(width, device="cuda",
                                                                                      dtype=torch.bfloat16)
    inputs = [x, residual, weight, bias] if op == "add_layer_norm" else [x, weight, bias]
    got = fn(*inputs)
    cotangents = [torch.randn_like(x) for _ in range(len(inputs) - 2)]
    expected = layernorm.fp32_reference(op, inputs, cotangents)[0]
    for out, ref in zip(got if isinstance(got, tuple) else (got,), expected):
        layernorm.common.check_close("output", out, ref, torch.bfloat16)
    seconds = _time(benchmark, lambda: fn(*inputs), rounds=100)
    moved = layernorm.layer_norm_bytes(rows, width, 2, "fwd", with_residual=op == "add_layer_norm")
    benchmark.extra_info["gbps"] = moved / seconds / 1e9


@pytest.mark.parametrize("backend", ["triton", "sdpa", "eager"])
def test_train_step(benchmark, backend):
    from bench import train

    idx, targets = train.batch_of("reference")
    _, train_step, _, _ = train.prepare("reference", backend, "eager mode", idx, train.reference("reference", idx))
    seconds = _time(benchmark, lambda: train_step(idx, targets), rounds=10)
    benchmark.extra_info["tokens_per_s"] = idx.numel() / seconds
