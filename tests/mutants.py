"""python tests/mutants.py [NAME ...]: how strong the suite is. Each mutant below is a small, plausible bug; this
plants them one at a time in a scratch copy of the checkout, runs the tests that should catch it, and reports which
survive. Not part of the default test run (minutes, not seconds): run it (`make mutants`) after changing the
kernels or the tests, and add a mutant for every bug a test was written to catch.

A mutant whose text is no longer in its file is reported as stale: update it with the code it was written for.
Exit status: 0 when every mutant is caught, 1 otherwise.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPIED = ("kernels", "gpt", "bench", "tests", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the checkout
    original: str  # text that occurs exactly once in the file
    mutated: str
    tests: tuple  # pytest arguments that should fail with the mutant planted


MUTANTS = [
    # Attention kernels
    Mutant("causal mask one key short", "kernels/attention/shared.py", "seen = seen & (key_idx - query_idx <= last)",
           "seen = seen & (key_idx - query_idx < last)", ("tests/test_attention.py",)),
    Mutant("window's left edge one key off", "kernels/attention/shared.py",
           "seen = seen & (key_idx - query_idx >= first)", "seen = seen & (key_idx - query_idx > first)",
           ("tests/test_attention.py", "-k", "window")),
    Mutant("window's unmasked keys start at a query-block boundary", "kernels/attention/shared.py",
           "full_lo = tl.cdiv(tl.maximum(last_row + first, 0), BLOCK_N) * BLOCK_N",
           "full_lo = tl.cdiv(tl.maximum(last_row + first, 0), BLOCK_M) * BLOCK_M",
           ("tests/test_attention.py", "-k", "non_square")),
    Mutant("online softmax forgets to rescale the accumulator", "kernels/attention/forward.py",
           "acc = acc * alpha[:, None]", "acc = acc", ("tests/test_attention.py",)),
    Mutant("dS without the delta term", "kernels/attention/backward.py", "ds = p * (dp - delta[:, None])",
           "ds = p * dp", ("tests/test_attention.py",)),
    Mutant("dK without the softmax scale", "kernels/attention/backward.py", "store_tile(DK, dk * scale,",
           "store_tile(DK, dk,", ("tests/test_attention.py",)),
    Mutant("query heads mapped to key/value heads round-robin", "kernels/attention/shared.py",
           "kv_head = h // (H // H_KV)", "kv_head = h % H_KV", ("tests/test_attention.py", "-k", "grouped")),
    Mutant("packed keys start where the queries start", "kernels/attention/shared.py",
           "k_start, n_k = sequence_of(b, CU_SEQLENS_K, N_K, VARLEN)",
           "k_start, n_k = sequence_of(b, CU_SEQLENS_Q, N_Q, VARLEN)", ("tests/test_attention_varlen.py",)),
    Mutant("log-sum-exp left in log2", "kernels/attention/api.py", "lse * _LN_2", "lse",
           ("tests/test_attention.py", "-k", "log_sum_exp")),
    Mutant("bf16 sent to the interpreter's wrong products", "kernels/attention/api.py",
           "if TRITON_INTERPRETS and q.dtype == torch.bfloat16:\n        return _through_fp32(attention,",
           "if False:\n        return _through_fp32(attention,", ("tests/test_attention.py", "-k", "bf16")),
    Mutant("bf16 log-sum-exp rounded to bf16 on the interpreter's fp32 detour", "kernels/attention/api.py",
           "(result[0].to(torch.bfloat16), result[1])",
           "(result[0].to(torch.bfloat16), result[1].to(torch.bfloat16))",
           ("tests/test_attention.py", "-k", "log_sum_exp_in_every_dtype")),
    Mutant("packed key grid sized from the longest query sequence", "kernels/attention/ops.py",
           "cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k",
           "cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_q",
           ("tests/test_attention_varlen.py", "-k", "far_apart")),
    # Decoding
    Mutant("split-KV combine weighs the chunks against the first chunk's log-sum-exp", "kernels/attention/decode.py",
           "m_new = tl.maximum(m_i, lse)", 'm_new = tl.where(m_i == float("-inf"), lse, m_i)',
           ("tests/test_decode.py", "-k", "dominates")),
    # Dropout
    Mutant("dropout mask constant along each row", "kernels/attention/shared.py",
           "rows[:, None] * tl.cdiv(n_k, 4) + groups[None, :]", "rows[:, None] * tl.cdiv(n_k, 4) + groups[None, :] * 0",
           ("tests/test_attention_dropout.py",)),
    Mutant("one Philox draw for four keys", "kernels/attention/shared.py",
           "keep = tl.join(tl.join(keep0, keep2), tl.join(keep1, keep3))",
           "keep = tl.join(tl.join(keep0, keep0), tl.join(keep0, keep0))", ("tests/test_attention_dropout.py",)),
    Mutant("kept weights not scaled up", "kernels/attention/forward.py",
           "p = tl.where(keep, p * dropout_scale, 0.0)", "p = tl.where(keep, p, 0.0)",
           ("tests/test_attention_dropout.py",)),
    Mutant("the module never applies its attention dropout", "kernels/modules.py",
           "dropout_p = self.attention_dropout if self.training else 0.0", "dropout_p = 0.0",
           ("tests/test_attention_model.py",)),
    # LayerNorm
    Mutant("eps outside the square root", "kernels/layer_norm/kernels.py", "rstd = 1.0 / tl.sqrt(var + eps)",
           "rstd = 1.0 / tl.sqrt(var) + eps", ("tests/test_layer_norm.py",)),
    Mutant("dx without the mean(g) term", "kernels/layer_norm/kernels.py",
           "dx = (g - mean_g[:, None] - x_hat * mean_g_x_hat[:, None]) * rstd[:, None]\n        _store_dx",
           "dx = (g - x_hat * mean_g_x_hat[:, None]) * rstd[:, None]\n        _store_dx",
           ("tests/test_layer_norm.py",)),
    Mutant("dweight from the first program's rows only", "kernels/layer_norm/ops.py",
           "dweight = dweight_partial.sum(0)", "dweight = dweight_partial[0]", ("tests/test_layer_norm.py",)),
    Mutant("streamed statistics from sum and sum of squares", "kernels/layer_norm/kernels.py",
           "        delta = chunk_mean - mean\n"
           "        total_count = seen_count + chunk_count\n"
           "        mean += delta * (chunk_count / total_count)\n"
           "        squared_deviations += tl.sum(chunk_centered * chunk_centered, axis=1)\n"
           "        squared_deviations += delta * delta * (seen_count * chunk_count / total_count)\n"
           "        seen_count = total_count\n",
           "        total_count = seen_count + chunk_count\n"
           "        mean += tl.sum(x, axis=1) / n_cols\n"
           "        squared_deviations += tl.sum(x * x, axis=1)\n"
           "        seen_count = total_count\n"
           "    squared_deviations -= mean * mean * n_cols\n",
           ("tests/test_layer_norm.py", "-k", "far_from_zero")),
    Mutant("streamed forward reads x at the row width, not its stride", "kernels/layer_norm/kernels.py",
           "tl.program_id(0) + tl.arange(0, ROWS)\n    row_mask = rows < n_rows\n"
           "    x_rows = X + rows[:, None] * stride_x",
           "tl.program_id(0) + tl.arange(0, ROWS)\n    row_mask = rows < n_rows\n"
           "    x_rows = X + rows[:, None] * n_cols",
           ("tests/test_layer_norm.py", "-k", "strided_views")),
    Mutant("streamed backward reads x at the row width, not its stride", "kernels/layer_norm/kernels.py",
           "    mask = row_mask[:, None] & col_mask[None, :]\n    x = tl.load(X + rows[:, None] * stride_x",
           "    mask = row_mask[:, None] & col_mask[None, :]\n    x = tl.load(X + rows[:, None] * n_cols",
           ("tests/test_layer_norm.py", "-k", "strided_views")),
    Mutant("streamed forward reads the residual at x's stride", "kernels/layer_norm/kernels.py",
           "residual_rows = RESIDUAL + rows[:, None] * stride_residual\n    sum_rows = SUM + rows[:, None] * n_cols\n"
           "    y_rows = Y + rows[:, None] * n_cols\n    # Pass 1",
           "residual_rows = RESIDUAL + rows[:, None] * stride_x\n    sum_rows = SUM + rows[:, None] * n_cols\n"
           "    y_rows = Y + rows[:, None] * n_cols\n    # Pass 1",
           ("tests/test_layer_norm.py", "-k", "strided_views")),
    Mutant("streamed backward's programs accumulate into one shared partial row", "kernels/layer_norm/kernels.py",
           "partial_offset = pid * n_cols\n    for tile in range(pid, n_tiles, programs):",
           "partial_offset = 0\n    for tile in range(pid, n_tiles, programs):", ("tests/test_program_order.py",)),
    # Model and data
    Mutant("attention block without its residual", "gpt/model.py", "x = x + self.sa(self.ln1(x), cache)",
           "x = self.sa(self.ln1(x), cache)", ("tests/test_model.py",)),
    Mutant("top-k keeps only the largest logit", "gpt/model.py",
           "torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]",
           "torch.topk(logits, min(top_k, logits.size(-1))).values[:, :1]", ("tests/test_model.py",)),
    Mutant("the last batch window never drawn", "gpt/data.py",
           "torch.randint(len(data) - self.block_size, (batch_size,)",
           "torch.randint(len(data) - self.block_size - 1, (batch_size,)", ("tests/test_data.py",)),
    Mutant("rank r draws rank 0's batch of r steps later", "gpt/train.py",
           "seed + runtime.rank + runtime.world_size * step", "seed + runtime.rank + step",
           ("tests/test_ddp.py", "-k", "own_batch")),
    # Generation with a cache
    Mutant("sdpa's cached mask aligned to the newest query only", "kernels/modules.py", ".tril(n_k - n_q)",
           ".tril(n_k - 1)", ("tests/test_generate.py", "-k", "several_tokens_at_once")),
    Mutant("the eager head's causal mask skipped when continuing a cache", "gpt/model.py",
           "wei = wei.masked_fill(self.tril", "wei = wei if start else wei.masked_fill(self.tril",
           ("tests/test_generate.py", "-k", "several_tokens_at_once")),
    # transformers integration
    Mutant("transformers: sliding window one key too wide", "kernels/integrations/transformers.py",
           "(sliding_window - 1, 0)", "(sliding_window, 0)", ("tests/test_transformers.py", "-k", "qwen2")),
    Mutant("transformers: left padding dropped", "kernels/integrations/transformers.py",
           "if n_keys == kv_length and bool(padding.all()):", "if n_keys == kv_length:",
           ("tests/test_transformers.py", "-k", "left-padded")),
    Mutant("transformers: queries unpadded by the first keys' padding", "kernels/integrations/transformers.py",
           "key_padding[:, -n_queries:]", "key_padding[:, :n_queries]",
           ("tests/test_transformers.py", "-k", "cache_continued")),
    Mutant("transformers: a static cache's unfilled slots attended", "kernels/integrations/transformers.py",
           "n_keys = min(kv_length, int(q_offset + q_length - kv_offset))", "n_keys = kv_length",
           ("tests/test_transformers.py", "-k", "static")),
    Mutant("transformers: the model's softmax scale ignored", "kernels/integrations/transformers.py",
           '"scale": scaling', '"scale": None', ("tests/test_transformers.py", "-k", "gpt2")),
    Mutant("transformers: training dropout never applied", "kernels/integrations/transformers.py",
           '"dropout_p": dropout if module.training else 0.0', '"dropout_p": 0.0',
           ("tests/test_transformers.py", "-k", "dropout")),
    Mutant("transformers: padding assumed all on the left", "kernels/integrations/transformers.py",
           "first = padding.int().argmax(dim=1, keepdim=True)", "first = (~padding).sum(dim=1, keepdim=True)",
           ("tests/test_transformers.py", "-k", "right_and_mixed")),
    Mutant("transformers: any mask pattern accepted", "kernels/integrations/transformers.py",
           "if mask_function is causal_mask_function and local_size is None:", "if True:",
           ("tests/test_transformers.py", "-k", "refused")),
]


def _scratch_copy(destination):
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, destination / name)


def run(mutant, scratch):
    """'caught', 'SURVIVED' or 'stale' for one mutant, planted in the scratch copy and removed again."""
    path = scratch / mutant.path
    original = path.read_text()
    if original.count(mutant.original) != 1:
        return "stale"
    path.write_text(original.replace(mutant.original, mutant.mutated))
    try:
        env = dict(os.environ, PYTHONPATH=str(scratch))
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                 *mutant.tests], cwd=scratch, env=env, capture_output=True, text=True)
        return "caught" if result.returncode != 0 else "SURVIVED"
    finally:
        path.write_text(original)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only the mutants whose name contains one of these words")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or any(word in m.name for word in args.names)]
    outcomes = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        _scratch_copy(scratch)
        for mutant in chosen:
            started = time.perf_counter()
            outcomes[mutant.name] = run(mutant, scratch)
            print(f"{outcomes[mutant.name]:>9}  {mutant.name}  ({time.perf_counter() - started:.0f} s)", flush=True)
    caught = sum(outcome == "caught" for outcome in outcomes.values())
    print(f"\n{caught} of {len(outcomes)} mutants caught")
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
