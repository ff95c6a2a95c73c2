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
COPIED = ("kernels", "gpt", "bench", "tools", "tests", "pyproject.toml")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the checkout
    original: str  # text that occurs exactly once in the file
    mutated: str
    tests: tuple  # pytest arguments that should fail with the mutant planted


MUTANTS = [
    # Attention kernels
    Mutant("causal mask one key short", "kernels/attention/band.py", "seen = seen & (key_idx - query_idx <= last)",
           "seen = seen & (key_idx - query_idx < last)", ("tests/test_attention.py",)),
    Mutant("window's left edge one key off", "kernels/attention/band.py",
           "seen = seen & (key_idx - query_idx >= first)", "seen = seen & (key_idx - query_idx > first)",
           ("tests/test_attention.py", "-k", "window")),
    Mutant("online softmax forgets to rescale the accumulator", "kernels/attention/shared.py",
           "acc = acc * alpha[:, None]", "acc = acc", ("tests/test_attention.py",)),
    Mutant("the backward launch leaves out the register cap", "kernels/attention/ops.py",
           "maxnreg=tiles.backward_max_registers(launch.head_dim, q.dtype, aligned),", "",
           ("tests/test_attention_launch.py", "-k", "caps_registers")),
    Mutant("dS without the delta term", "kernels/attention/backward_programs.py", "ds = p * (dp - delta[:, None])",
           "ds = p * dp", ("tests/test_attention.py",)),
    Mutant("dK without the softmax scale", "kernels/attention/backward_programs.py", "store_tile(DK, dk * scale,",
           "store_tile(DK, dk,", ("tests/test_attention.py",)),
    Mutant("query heads mapped to key/value heads round-robin", "kernels/attention/shared.py",
           "kv_head = h // (H // H_KV)", "kv_head = h % H_KV", ("tests/test_attention.py", "-k", "grouped")),
    Mutant("packed keys start where the queries start", "kernels/attention/shared.py",
           "k_start, n_k = sequence_of(b, CU_SEQLENS_K, N_K, VARLEN)",
           "k_start, n_k = sequence_of(b, CU_SEQLENS_Q, N_Q, VARLEN)", ("tests/test_attention_varlen.py",)),
    Mutant("log-sum-exp left in log2", "kernels/attention/api.py", "lse * _LN_2", "lse",
           ("tests/test_attention.py", "-k", "log_sum_exp")),
    Mutant("bf16 sent to the interpreter's wrong products", "kernels/_library.py",
           "argument.float() if _is_bf16(argument) else argument", "argument",
           ("tests/test_attention.py", "-k", "bf16")),
    Mutant("the interpreter's bf16 decoding copies the cache without the appended keys", "kernels/decode/ops.py",
           "int(cache_seqlens.max()) + n_new", "int(cache_seqlens.max())", ("tests/test_decode.py", "-k", "bf16")),
    Mutant("bf16 log-sum-exp rounded to bf16 on the interpreter's fp32 detour", "kernels/_library.py",
           "out if i in fp32_outputs else out.to(torch.bfloat16)", "out.to(torch.bfloat16)",
           ("tests/test_attention.py", "-k", "log_sum_exp_in_every_dtype")),
    Mutant("packed key grid sized from the longest query sequence", "kernels/attention/ops.py",
           "cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k",
           "cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_q",
           ("tests/test_attention_varlen.py", "-k", "far_apart")),
    # Decoding
    Mutant("split-KV combine weighs the chunks against the first chunk's log-sum-exp", "kernels/decode/kernels.py",
           "m_new = tl.maximum(m_i, lse)", 'm_new = tl.where(m_i == float("-inf"), lse, m_i)',
           ("tests/test_decode.py", "-k", "dominates")),
    # A call's path: the eager and compiled routes, launches, host reads
    Mutant("the eager route skips the backward of the first input", "kernels/_library.py",
           "backward=staticmethod(once_differentiable(backward))",
           "backward=staticmethod(once_differentiable(lambda ctx, *grads: (None, *backward(ctx, *grads)[1:])))",
           ("tests/test_torch_compile.py", "-k", "same_gradients")),
    Mutant("the compiled route takes the eager one", "kernels/_library.py",
           "return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0",
           "return (torch._C._len_torch_dispatch_stack() > 0", ("tests/test_host_path.py", "-k", "compiled_graph")),
    Mutant("eager calls pay the operators' dispatch", "kernels/_library.py",
           "        if traced():\n            return self.op(*args, **kwargs)",
           "        if True:\n            return self.op(*args, **kwargs)",
           ("tests/test_host_path.py", "-k", "eager_call")),
    Mutant("autograd materialises a zero gradient for the LSE", "kernels/attention/ops.py",
           "    ctx.set_materialize_grads(False)\n", "", ("tests/test_host_path.py", "-k", "torch_side")),
    Mutant("a dropout seed drawn without dropout", "kernels/attention/api.py",
           "    if dropout_p == 0:\n        return None\n", "", ("tests/test_host_path.py", "-k", "torch_side")),
    Mutant("the dropout seed read back to the host", "kernels/attention/api.py",
           "        return attention_dropout_seed(like)",
           "        return torch.full((1,), int(attention_dropout_seed(like)), dtype=torch.int64, device=like.device)",
           ("tests/test_host_path.py", "-k", "reads_no_device_value")),
    Mutant("a zero gradient filled in for add_layer_norm's unused y", "kernels/layer_norm/ops.py",
           "        return (dsum, dsum) + (None,) * 8\n", "        dy = torch.zeros_like(dsum)\n",
           ("tests/test_host_path.py", "-k", "only_its_sum")),
    # Attention at the tiles a GPU runs: the band's block ranges, the diagonal pieces, the backward's program split
    Mutant("the window's unmasked left edge rounded to BLOCK_M instead of BLOCK_N", "kernels/attention/band.py",
           "full_lo = tl.cdiv(tl.maximum(last_row + first, 0), BLOCK_N) * BLOCK_N",
           "full_lo = tl.cdiv(tl.maximum(last_row + first, 0), BLOCK_M) * BLOCK_M",
           ("tests/test_attention_tiles.py", "-k", "every_shipped and forward")),
    Mutant("the keys' unmasked queries rounded to BLOCK_N instead of BLOCK_M", "kernels/attention/band.py",
           "full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - last, 0), BLOCK_M) * BLOCK_M",
           "full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - last, 0), BLOCK_N) * BLOCK_N",
           ("tests/test_attention_tiles.py", "-k", "every_shipped and backward")),
    Mutant("a diagonal piece streams its block's unmasked range again", "kernels/attention/band.py",
           "return lo, tl.minimum(hi, full_lo), tl.maximum(lo, full_hi), hi",
           "return lo, hi, tl.maximum(lo, full_hi), hi", ("tests/test_attention.py", "-k", "window")),
    Mutant("the last, partial diagonal piece skipped", "kernels/attention/forward.py",
           "for piece in range(tl.cdiv(tl.minimum(n_q - start_m, BLOCK_M), DIAGONAL_ROWS)):",
           "for piece in range(tl.minimum(n_q - start_m, BLOCK_M) // DIAGONAL_ROWS):",
           ("tests/test_attention.py", "-k", "sequence_lengths")),
    Mutant("every diagonal piece starts from the block's first running max", "kernels/attention/forward.py",
           "m_piece = rows_of(m_i, piece * DIAGONAL_ROWS, DIAGONAL_ROWS)", "m_piece = rows_of(m_i, 0, DIAGONAL_ROWS)",
           ("tests/test_attention.py", "-k", "sequence_lengths")),
    Mutant("the diagonal pieces step through whole key blocks", "kernels/attention/forward.py",
           "lo=after_lo, hi=after_hi,\n                    BLOCK_M=DIAGONAL_ROWS, BLOCK_N=DIAGONAL_ROWS",
           "lo=after_lo, hi=after_hi,\n                    BLOCK_M=DIAGONAL_ROWS, BLOCK_N=BLOCK_N",
           ("tests/test_attention_tiles.py", "-k", "pieces")),
    Mutant("head size 256's whole left edge blocks skipped", "kernels/attention/forward.py",
           "lo=lo, hi=full_lo,", "lo=full_lo, hi=full_lo,", ("tests/test_attention.py", "-k", "256")),
    Mutant("every dK program of a sliced head takes the first column slice", "kernels/attention/backward.py",
           "first_column = (role % HEAD_SLICES)", "first_column = (role // HEAD_SLICES)",
           ("tests/test_attention.py", "-k", "column_slices")),
    Mutant("the aligned copies' gradients not copied back", "kernels/attention/ops.py",
           "            grad.copy_(computed)", "            grad.zero_()",
           ("tests/test_attention.py", "-k", "aligned_copies")),
    Mutant("partial key blocks loaded without bounds masks", "kernels/attention/ops.py",
           "self.n_q % block == 0 and self.n_k % block == 0", "self.n_q % block == 0",
           ("tests/test_attention_tiles.py", "-k", "bounds")),
    Mutant("a key program's group of query heads taken round-robin", "kernels/attention/backward_programs.py",
           "        for g in range(group):\n            h = kv_head * group + g",
           "        for g in range(group):\n            h = kv_head + g * H_KV",
           ("tests/test_attention.py", "-k", "grouped")),
    Mutant("a key program per query head", "kernels/attention/backward.py",
           "key_programs = tl.cdiv(N_K, BLOCK_N1) * B * H_KV", "key_programs = tl.cdiv(N_K, BLOCK_N1) * B * H",
           ("tests/test_attention.py", "-k", "grouped")),
    Mutant("the dV programs take the dK programs' blocks", "kernels/attention/backward.py",
           "role < 2 * HEAD_SLICES:\n        key_block_program(\n            pid % key_programs,",
           "role < 2 * HEAD_SLICES:\n        key_block_program(\n            pid,",
           ("tests/test_attention_tiles.py", "-k", "every_shipped and backward")),
    Mutant("the longest-first order one block off", "kernels/attention/shared.py",
           "block = blocks - 1 - block", "block = blocks - block", ("tests/test_attention.py", "-k", "causal")),
    Mutant("the dropout mask counted from the tile's first row", "kernels/attention/shared.py",
           "rows = first_query + tl.arange(0, BLOCK_Q)", "rows = tl.arange(0, BLOCK_Q)",
           ("tests/test_attention_dropout.py", "-k", "helpers_mask")),
    # Argument checks
    Mutant("a window of the wrong type taken for a wrong value", "kernels/attention/checks.py",
           "raise TypeError(expected)", "raise ValueError(expected)", ("tests/test_errors.py",)),
    Mutant("the varlen dropout mask reads any cu_seqlens", "kernels/attention/dropout_mask.py",
           "    check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k)\n", "", ("tests/test_errors.py",)),
    # Dropout
    Mutant("dropout mask constant along each row", "kernels/attention/shared.py",
           "rows[:, None] * tl.cdiv(n_k, 4) + groups[None, :]", "rows[:, None] * tl.cdiv(n_k, 4) + groups[None, :] * 0",
           ("tests/test_attention_dropout.py",)),
    Mutant("one Philox draw for four keys", "kernels/attention/shared.py",
           "keep = tl.join(tl.join(keep0, keep2), tl.join(keep1, keep3))",
           "keep = tl.join(tl.join(keep0, keep0), tl.join(keep0, keep0))", ("tests/test_attention_dropout.py",)),
    Mutant("kept weights not scaled up", "kernels/attention/shared.py",
           "p = tl.where(keep, p * dropout_scale, 0.0)", "p = tl.where(keep, p, 0.0)",
           ("tests/test_attention_dropout.py",)),
    Mutant("the module never applies its attention dropout", "kernels/modules.py",
           "dropout_p = self.attention_dropout if self.training else 0.0", "dropout_p = 0.0",
           ("tests/test_attention_model.py",)),
    # LayerNorm
    Mutant("eps outside the square root", "kernels/layer_norm/forward.py", "rstd = 1.0 / tl.sqrt(var + eps)",
           "rstd = 1.0 / tl.sqrt(var) + eps", ("tests/test_layer_norm.py",)),
    Mutant("dx without the mean(g) term", "kernels/layer_norm/backward.py",
           "centered_g = g if RMS else g - (sum_g / n_cols)[:, None]", "centered_g = g",
           ("tests/test_layer_norm.py",)),
    Mutant("dweight from the first program's rows only", "kernels/layer_norm/backward.py",
           "row_mask = col_mask & (first_row + step < n_partials)", "row_mask = col_mask & (first_row + step < 1)",
           ("tests/test_layer_norm_grid.py", "-k", "grid_shapes")),
    Mutant("a row tile added twice: each program's run overlaps the next one's", "kernels/layer_norm/shared.py",
           "return first, tl.minimum(first + per_program, n_items)",
           "return first, tl.minimum(first + per_program + 1, n_items)",
           ("tests/test_layer_norm_grid.py", "-k", "grid_shapes")),
    Mutant("a program's last row tile skipped", "kernels/layer_norm/shared.py",
           "return first, tl.minimum(first + per_program, n_items)",
           "return first, tl.minimum(first + per_program, n_items) - 1",
           ("tests/test_layer_norm_grid.py", "-k", "grid_shapes")),
    Mutant("a column tile's partial dweight / dbias lost", "kernels/layer_norm/backward.py",
           "tl.program_id(1), cols, col_mask, n_cols,",
           "tl.program_id(1), cols, col_mask & (column_tile != 1), n_cols,",
           ("tests/test_layer_norm_grid.py", "-k", "every_width_class")),
    Mutant("the partial rows summed in reverse order", "kernels/layer_norm/backward.py",
           "offsets = (first_row + step) * n_cols + cols",
           "offsets = (n_partials - 1 - first_row - step) * n_cols + cols",
           ("tests/test_layer_norm_grid.py", "-k", "program_order")),
    Mutant("streamed add_layer_norm normalizes x, not the sum it stored", "kernels/layer_norm/forward.py",
           "(sum_row if HAS_RESIDUAL else x_row)", "x_row",
           ("tests/test_layer_norm_grid.py", "-k", "every_width_class")),
    Mutant("the streamed backward's row sums taken from the first column tile only", "kernels/layer_norm/backward.py",
           "for tile_sums in range(0, column_tiles):", "for tile_sums in range(0, 1):",
           ("tests/test_layer_norm_grid.py", "-k", "every_width_class")),
    Mutant("streamed statistics from sum and sum of squares", "kernels/layer_norm/forward.py",
           "        mean += delta * (chunk_count / total)\n"
           "        squared_deviations += tl.sum(chunk_centered * chunk_centered, axis=0) + delta * delta * (\n"
           "            count * chunk_count / total)\n",
           "        new_mean = (mean * count + tl.sum(x, axis=0)) / total\n"
           "        squared_deviations += tl.sum(x * x, axis=0) + mean * mean * count - new_mean * new_mean * total\n"
           "        mean = new_mean\n",
           ("tests/test_layer_norm.py", "-k", "far_from_zero")),
    Mutant("forward reads x at the row width, not its stride", "kernels/layer_norm/forward.py",
           "x = load_input(X + rows[:, None] * stride_x + cols[None, :],",
           "x = load_input(X + rows[:, None] * n_cols + cols[None, :],",
           ("tests/test_layer_norm.py", "-k", "strided_views")),
    Mutant("streamed forward reads x at the row width, not its stride", "kernels/layer_norm/forward.py",
           "x_row = X + row * stride_x", "x_row = X + row * n_cols",
           ("tests/test_layer_norm.py", "-k", "strided_views")),
    Mutant("backward reads x at the row width, not its stride", "kernels/layer_norm/backward.py",
           "x = tl.load(X + rows[:, None] * stride_x", "x = tl.load(X + rows[:, None] * n_cols",
           ("tests/test_layer_norm.py", "-k", "strided_views")),
    Mutant("forward reads the residual at x's stride", "kernels/layer_norm/forward.py",
           "RESIDUAL + rows[:, None] * stride_residual + cols[None, :],",
           "RESIDUAL + rows[:, None] * stride_x + cols[None, :],", ("tests/test_layer_norm.py", "-k", "strided_views")),
    Mutant("the backward's programs store their partials into one shared row", "kernels/layer_norm/backward.py",
           "dweight, dbias, tl.program_id(0), cols, col_mask, n_cols,", "dweight, dbias, 0, cols, col_mask, n_cols,",
           ("tests/test_program_order.py",)),
    # RMSNorm, dropout before the add, a sum kept in fp32 (the norms' shared kernels)
    Mutant("the offset weight ignored", "kernels/layer_norm/shared.py",
           "x_hat = x_hat * (w.to(tl.float32) + offset)", "x_hat = x_hat * w.to(tl.float32)",
           ("tests/test_rms_norm.py",)),
    Mutant("the offset weight ignored in the backward", "kernels/layer_norm/backward.py",
           "g = dy * (WEIGHT_TILE.to(tl.float32) + offset) if HAS_WEIGHT else dy",
           "g = dy * WEIGHT_TILE.to(tl.float32) if HAS_WEIGHT else dy", ("tests/test_rms_norm.py",)),
    Mutant("RMSNorm takes the mean out of rows held on chip", "kernels/layer_norm/forward.py",
           "        if RMS:\n            centered = tl.where(mask, x, 0.0)",
           "        if False:\n            centered = tl.where(mask, x, 0.0)", ("tests/test_rms_norm.py",)),
    Mutant("the residual added before dropout's scale (scaled with x)", "kernels/layer_norm/shared.py",
           "x = tl.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0)\n"
           "        s = (x + tl.load(residual_pointers, mask=mask, other=0.0).to(tl.float32))",
           "x = tl.where(keep, x, 0.0)\n"
           "        s = ((x + tl.load(residual_pointers, mask=mask, other=0.0).to(tl.float32)) / (1.0 - dropout_p))",
           ("tests/test_norm_dropout.py",)),
    Mutant("the backward's dropout mask drawn at column 0 of every column tile", "kernels/layer_norm/backward.py",
           "keep = dropout_keep(seed, rows, first_col, n_cols, dropout_p, ROWS, BLOCK_N)",
           "keep = dropout_keep(seed, rows, 0, n_cols, dropout_p, ROWS, BLOCK_N)",
           ("tests/test_norm_dropout.py", "-k", "matches_eager")),
    Mutant("x's gradient through dropout not scaled up", "kernels/layer_norm/backward.py",
           "tl.where(keep, dx * (1.0 / (1.0 - dropout_p)), 0.0)", "tl.where(keep, dx, 0.0)",
           ("tests/test_norm_dropout.py", "-k", "matches_eager")),
    Mutant("a sum kept in fp32 rounded to x's dtype", "kernels/layer_norm/shared.py",
           ".to(tl.float32)).to(sum_pointers.dtype.element_ty)", ".to(tl.float32)).to(x_pointers.dtype.element_ty)",
           ("tests/test_rms_norm.py", "-k", "residual_in_fp32")),
    Mutant("the Block's fused add + ln2 never drops the attention output", "gpt/model.py",
           "dropout_p = self.sa.dropout.p if self.sa.dropout.training else 0.0", "dropout_p = 0.0",
           ("tests/test_layer_norm_model.py", "-k", "same_mask")),
    # The transformers norm swap
    Mutant("the norm swap leaves the last norm it finds unswapped", "kernels/integrations/transformers.py",
           "for path, fused in swaps.items():", "for path, fused in list(swaps.items())[:-1]:",
           ("tests/test_transformers.py", "-k", "fused_norms_match")),
    Mutant("the norm swap refuses after swapping the norms before", "kernels/integrations/transformers.py",
           "        swaps[path] = replacements[id(module)]\n",
           "        swaps[path] = replacements[id(module)]\n        parent, _, name = path.rpartition('.')\n"
           "        setattr(model.get_submodule(parent), name, swaps[path])\n",
           ("tests/test_transformers.py", "-k", "refused_and_nothing")),
    # The work counter (bench/workcount.py)
    Mutant("work counter: masked-out elements counted as moved", "bench/workcount.py",
           "addresses = addresses[np.broadcast_to(mask, addresses.shape)]", "addresses = addresses.ravel()",
           ("tests/test_workcount.py",)),
    Mutant("work counter: padding pairs counted as visible", "bench/workcount.py", "visible = ~padding",
           "visible = np.ones_like(padding)", ("tests/test_workcount.py", "-k", "attention")),
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
    # Training: gpt/step.py, gpt/throughput.py, gpt/train.py, bench/train.py
    Mutant("autocast never enabled", "gpt/step.py", 'enabled=self.dtype != "float32",', "enabled=False,",
           ("tests/test_train_step.py", "-k", "low_precision")),
    Mutant("fp16 trains without its GradScaler", "gpt/step.py", 'enabled=settings.dtype == "float16")',
           "enabled=False)", ("tests/test_train_step.py", "-k", "low_precision")),
    Mutant("weights cast to the autocast dtype", "gpt/train.py", "model = GPT(config).to(runtime.device)",
           "model = GPT(config).to(runtime.device, DTYPES[settings.dtype])",
           ("tests/test_train.py", "-k", "precisions")),
    Mutant("--compile trains the model uncompiled", "gpt/step.py",
           "trained = torch.compile(model, fullgraph=True) if settings.compile else model", "trained = model",
           ("tests/test_train_step.py", "-k", "compiled")),
    Mutant("CUDA-graph replays train on the captured batch", "gpt/step.py",
           "self.static_x.copy_(x)\n            self.static_y.copy_(y)", "pass",
           ("tests/test_train_step.py", "-k", "cuda_graph")),
    Mutant("a resumed optimizer keeps the checkpoint's options", "gpt/step.py",
           "groups = [{**saved, **options} for saved, options in zip(state[\"param_groups\"], own, strict=True)]",
           "groups = state[\"param_groups\"]", ("tests/test_train.py", "-k", "optimizer_options")),
    Mutant("MFU counts the embedding tables", "gpt/throughput.py",
           "return 6 * matmul_weights(model) +", "return 6 * model.num_parameters() +",
           ("tests/test_train_step.py", "-k", "flops")),
    Mutant("tokens/s counts the evaluation time", "gpt/train.py",
           "throughput.restart()  # evaluating", "pass  # evaluating", ("tests/test_train.py", "-k", "tokens_per_s")),
    Mutant("tokens/s counts the warm-up steps", "gpt/train.py",
           "throughput.step_done(timed=not train_step.warming_up)", "throughput.step_done()",
           ("tests/test_train.py", "-k", "tokens_per_s")),
    Mutant("bench.train's models start from their own random weights", "bench/train.py",
           "    model.load_state_dict(weights)\n", "", ("tests/test_bench_train.py", "-k", "prepare")),
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
    Mutant("transformers: any mask pattern accepted", "kernels/integrations/transformers.py",
           "if mask_function is causal_mask_function and local_size is None:", "if True:",
           ("tests/test_transformers.py", "-k", "refused")),
    Mutant("transformers: padding assumed all on the left", "kernels/integrations/transformers.py",
           "first = padding.int().argmax(dim=1, keepdim=True)", "first = (~padding).sum(dim=1, keepdim=True)",
           ("tests/test_transformers.py", "-k", "right_and_mixed")),
    # flash-attn integration
    Mutant("flash-attn: (batch, seqlen, heads, headdim) read as (batch, heads, seqlen, headdim)",
           "kernels/integrations/flash_attn.py", "return t.transpose(1, 2)", "return t",
           ("tests/test_flash_attn.py", "-k", "func_matches")),
    Mutant("flash-attn: window_size read as (right, left)", "kernels/integrations/flash_attn.py",
           "window=tuple(window_size)", "window=tuple(window_size)[::-1]",
           ("tests/test_flash_attn.py", "-k", "window_size_is_left_then_right")),
    Mutant("flash-attn: decoding several queries without causal computed causally",
           "kernels/integrations/flash_attn.py", "if not (causal or right == 0 or seqlen_q == 1):", "if False:",
           ("tests/test_flash_attn.py", "-k", "refused")),
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
