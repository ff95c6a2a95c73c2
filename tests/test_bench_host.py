"""bench.host runs end to end (one round, short samples) and reports a row per public op and module, the host-bound
GPT step, Triton's binder for each call's launches on a CPU, the launches of a reference step and the wrappers."""

import json

import torch

from bench import host


def test_a_short_run_reports_every_call(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "SAMPLE_S", 0.0005)
    threads = torch.get_num_threads()
    host.main(["--rounds", "1", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # the run's one thread is not left behind
    run = json.loads((tmp_path / "host.json").read_text())
    calls = {row["call"].split(" (")[0] for row in run["rows"]}
    assert calls == {"kernels.attention", "kernels.attention_varlen", "kernels.layer_norm", "kernels.add_layer_norm",
                     "FusedMultiHeadAttention", "FusedLayerNorm", "kernels.decode_attention", "GPT step"}
    for row in run["rows"]:
        assert row["ours_us"] > 0 and row["native_us"] > 0 and row["ratio"] == row["ours_us"] / row["native_us"]
        if not torch.cuda.is_available():
            assert row["launches"] >= 1 and row["binder_us"] > 0, row["call"]
    assert sum(run["reference_step_launches"].values()) > 0
    assert len(run["wrappers"]) == 4 and len(run["goals"]) == 7
    assert "| GPT step" in (tmp_path / "host.md").read_text()
