"""bench/train.py's parts that need no GPU: the configurations it measures and their order, that each one is
gpt-train's own step with the settings gpt-train would choose (the device queries stubbed), the gpt-train command
it names for each, the goals, the fastest configuration and the markdown and JSON it writes; and its refusal
without a GPU."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import train
from gpt.step import TrainStep, resolve_settings
from gpt.train import parse_args

REPO = Path(__file__).resolve().parent.parent


def test_every_configuration_once_the_goals_comparisons_first_and_quick_is_a_subset():
    runs = train.runs()
    keys = [run[:3] for run in runs]
    assert sorted(keys) == sorted((c, b, m) for c in train.CONFIGS for b in train.BACKENDS for m in train.MODES)
    core = [run[:3] for run in runs if run[3]]
    assert keys[:len(core)] == core  # the core comparisons before any other
    for config in train.GOALS:  # the goals compare ours with SDPA in gpt-train's default mode
        assert {(config, "triton", "eager mode"), (config, "sdpa", "eager mode")} <= set(core)
    assert ("reference", "triton", "CUDA graphs") in core and ("reference", "sdpa", "CUDA graphs") in core
    quick = train.runs(quick=True)
    assert quick and all(run in runs for run in quick) and {run[0] for run in quick} == {"reference"}


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("backend", list(train.BACKENDS))
@pytest.mark.parametrize("mode", list(train.MODES))
def test_each_configuration_is_what_its_gpt_train_command_runs(fake_gpu, backend, mode, bf16):
    """The settings bench.train times are those gpt-train resolves for the command it prints; the triton backend
    in eager mode is gpt-train's default with no flag at all."""
    fake_gpu(bf16=bf16)
    settings = train.settings_for(backend, mode)
    command = shlex.split(train.command_for("reference", backend, mode))
    assert command[:3] == ["gpt-train", "--preset", "reference"]
    args = parse_args(command[1:])
    assert settings == resolve_settings("cuda", args.attention, args.layernorm, args.dtype, args.compile,
                                        args.cuda_graphs)  # fmt: skip
    assert settings.attention == {"triton": "triton", "sdpa": "sdpa", "eager": "eager"}[backend]
    assert (settings.compile, settings.cuda_graphs) == tuple(train.MODES[mode].values())
    assert settings.dtype == ("bfloat16" if bf16 else "float32" if settings.cuda_graphs else "float16")
    if (backend, mode) == ("triton", "eager mode"):
        assert command == ["gpt-train", "--preset", "reference"] and settings == resolve_settings("cuda")


def test_the_large_config_command_sets_its_shape():
    command = train.command_for("large", "sdpa", "compile")
    args = parse_args(shlex.split(command)[1:])
    large = train.CONFIGS["large"]
    assert (args.n_embd, args.n_head, args.n_layer, args.block_size, args.batch_size) == (
        large["n_embd"], large["n_head"], large["n_layer"], large["block_size"], large["batch"])
    assert args.compile and args.attention == "sdpa"


def test_prepare_builds_gpt_trains_step(monkeypatch):
    """On CPU, at a tiny config: the step prepared is a gpt.step.TrainStep with gpt-train's settings for the
    device, its model holds the eager model's weights (so its logits match the eager fp32 logits), and it
    trains."""
    monkeypatch.setitem(train.CONFIGS, "reference", dict(n_embd=16, n_head=2, n_layer=1, block_size=16, batch=4))
    idx, targets = train.batch_of("reference", device="cpu")
    model, train_step, settings, error = train.prepare("reference", "sdpa", "eager mode", idx,
                                                       train.reference("reference", idx))
    assert isinstance(train_step, TrainStep) and train_step.model is model
    assert settings == resolve_settings("cpu", attention="sdpa", layernorm="eager", compile=False, cuda_graphs=False)
    assert model.config.attention == "sdpa" and model.config.dropout == train.DROPOUT
    assert 0 <= error < 1e-5
    losses = [train_step(idx, targets).item() for _ in range(5)]
    assert losses[-1] < losses[0]


def entry(config, backend, mode, tokens_per_s, status="ok"):
    result = {"config": config, "backend": backend, "mode": mode, "status": status,
              "command": train.command_for(config, backend, mode)}  # fmt: skip
    if status == "ok":
        result.update(tokens_per_s=tokens_per_s, step_ms=config_tokens(config) / tokens_per_s * 1e3,
                      mfu=tokens_per_s * 6.6e7 / 989e12, peak_memory_mib=1500.0, dtype="bfloat16")  # fmt: skip
    return result


def config_tokens(config):
    return train.CONFIGS[config]["batch"] * train.CONFIGS[config]["block_size"]


def test_goals_fastest_and_markdown_from_a_run():
    results = [
        entry("reference", "triton", "eager mode", 1.5e6), entry("reference", "sdpa", "eager mode", 1.0e6),
        entry("reference", "eager", "eager mode", 0.5e6), entry("reference", "triton", "CUDA graphs", 3.0e6),
        entry("reference", "sdpa", "CUDA graphs", 2.8e6), entry("large", "triton", "eager mode", 0.4e6),
        entry("large", "sdpa", "eager mode", None, status="failed: RuntimeError: boom"),
        entry("reference", "triton", "compile", None, status="skipped: time budget spent"),
    ]  # fmt: skip
    goals = train.evaluate_goals(results)
    assert goals[0]["measured"] == "eager mode 1.50x; CUDA graphs 1.07x" and goals[0]["met"] is True
    assert goals[1]["measured"] is None and goals[1]["met"] is None  # the large config's SDPA failed
    assert train.evaluate_goals(results, default_mode="CUDA graphs")[0]["met"] is False  # 1.07 < 1.2
    best = train.fastest(results)
    assert (best["reference"]["backend"], best["reference"]["mode"]) == ("triton", "CUDA graphs")
    assert best["large"]["backend"] == "triton"

    run = {"results": results, "goals": goals, "settings": {"warmup_ms": 5, "rep_ms": 30},
           "ceilings": {"matmul_bf16_tflops": 735.0, "matmul_shape": "8192x8192x8192 bf16", "copy_gbps": 4221.0},
           "environment": {"card": "NVIDIA H200", "compute_capability": "9.0", "multiprocessors": 132,
                           "driver": "1", "cuda": "13", "torch": "2", "triton": "3", "git_commit": "abc",
                           "date": "today"}}  # fmt: skip
    markdown = train.to_markdown(run)
    assert ("- reference config: `gpt-train --preset reference --cuda-graphs` (triton, CUDA graphs): "
            "3,000,000 tokens/s") in markdown
    assert "FASTEST_ON_CARD['NVIDIA H200'] = dict(compile=False, cuda_graphs=True)" in markdown
    assert "| reference | triton | CUDA graphs | 3,000,000 | 20.0% | 6.00x | 1.07x |" in markdown
    assert "| large | sdpa | eager mode | — | — | — | — | — | — | failed: RuntimeError: boom |" in markdown
    assert json.loads(json.dumps(run)) == run  # what write_results stores


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without a GPU sees")
def test_refuses_plainly_without_a_gpu():
    done = subprocess.run([sys.executable, "-m", "bench.train", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr
