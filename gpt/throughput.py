"""How fast training goes: tokens per second over a rolling window of steps, and the model FLOPs utilisation (MFU),
the share of the card's peak bf16 rate that the model's own arithmetic would need at that speed.

The FLOPs are counted as nanoGPT's `estimate_mfu` counts them (after the PaLM paper, appendix B). Per token:
- 6 per weight of the matrix products: 2 in the forward, 4 in the backward (the input's and the weight's gradients);
- 12 * n_layer * n_embd * block_size for the attention's own products (QK^T and PV, forward and backward; nanoGPT
  writes it 12*L*H*Q*T with H*Q = n_embd, and counts the full T x T scores although a causal kernel skips half).
The weights are the parameters less the two embedding tables. nanoGPT subtracts its position table and keeps its
token table only because that table is also its output layer (weight tying). Here the output layer, lm_head, is a
parameter of its own and is counted as one, and a table lookup does no multiply-adds. LayerNorm weights and biases
count 6 each, as in nanoGPT.
"""

import collections
import re
import time

import torch

# The peak dense bf16 tensor-core rate (FLOP/s) of known cards. Each pattern is searched in the name torch gives the
# card (torch.cuda.get_device_name); the first that matches wins, so a variant comes before its family. NVIDIA's
# datasheets give these rates with 2:4 sparsity: the dense rate is half.
PEAK_BF16_FLOPS = [
    (r"\bH100 PCIe\b", 756e12),  # NVIDIA H100 datasheet: H100 PCIe, BF16 1,513 TFLOPS with sparsity
    (r"\bH100 NVL\b", 835e12),  # NVIDIA H100 datasheet: H100 NVL, BF16 1,671 TFLOPS with sparsity
    (r"\bH100\b", 989e12),  # NVIDIA H100 datasheet: H100 SXM ("NVIDIA H100 80GB HBM3"), 1,979 with sparsity
    (r"\bGH200\b", 989e12),  # NVIDIA GH200 Grace Hopper datasheet: its H100, BF16 1,979 TFLOPS with sparsity
    (r"\bH200 NVL\b", 835e12),  # NVIDIA H200 datasheet: H200 NVL, BF16 1,671 TFLOPS with sparsity
    (r"\bH200\b", 989e12),  # NVIDIA H200 datasheet: H200 SXM, BF16 1,979 TFLOPS with sparsity
    (r"\bA100\b", 312e12),  # NVIDIA A100 datasheet: BF16 312 TFLOPS (624 with sparsity), SXM and PCIe alike
    (r"\bL40S\b", 362e12),  # NVIDIA L40S datasheet: BF16 362.05 TFLOPS (733 with sparsity)
    (r"\bL4\b", 121e12),  # NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity
    (r"\bA10\b", 125e12),  # NVIDIA A10 datasheet: BF16 125 TFLOPS (250 with sparsity)
]

# Steps in the rolling window of the periodic log line.
WINDOW_STEPS = 50


def card_name(device) -> str | None:
    """The GPU's name as torch gives it, or None for a CPU."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def peak_bf16_flops(name: str | None) -> float | None:
    """The card's peak dense bf16 rate in FLOP/s, or None for a card not in PEAK_BF16_FLOPS (and for a CPU)."""
    if name is None:
        return None
    return next((peak for pattern, peak in PEAK_BF16_FLOPS if re.search(pattern, name)), None)


def matmul_weights(model) -> int:
    """The parameters that multiply activations: all of them less the embedding tables (see the docstring)."""
    tables = model.token_embedding_table.weight.numel() + model.position_embedding_table.weight.numel()
    return model.num_parameters() - tables


def flops_per_token(model) -> int:
    """Forward and backward FLOPs per trained token, as nanoGPT counts them (see the docstring)."""
    config = model.config
    return 6 * matmul_weights(model) + 12 * config.n_layer * config.n_embd * config.block_size


class Throughput:
    """Training tokens per second, over the last WINDOW_STEPS timed steps (the periodic log line) and over every
    timed step (the final summary).

    A step is timed from the end of the step before it to its own end (`step_done`), so whatever the training loop
    does between steps counts, except what `restart` leaves out: call it after evaluating or writing a checkpoint,
    and the clock starts again there. Warm-up steps (`step_done(timed=False)`: compilation, CUDA-graph capture,
    Triton's first compiles) end a step without counting it."""

    def __init__(self, tokens_per_step: int, window: int = WINDOW_STEPS):
        self.tokens_per_step = tokens_per_step
        self.recent = collections.deque(maxlen=window)
        self.timed_steps = 0
        self.timed_seconds = 0.0
        self.last = None

    def restart(self):
        self.last = time.perf_counter()

    def step_done(self, timed: bool = True):
        now = time.perf_counter()
        if timed and self.last is not None:
            seconds = now - self.last
            self.recent.append(seconds)
            self.timed_steps += 1
            self.timed_seconds += seconds
        self.last = now

    def recent_tokens_per_s(self) -> float | None:
        return self.tokens_per_step * len(self.recent) / sum(self.recent) if self.recent else None

    def overall_tokens_per_s(self) -> float | None:
        return self.tokens_per_step * self.timed_steps / self.timed_seconds if self.timed_steps else None


class SpeedReport:
    """Tokens/s, and MFU where the card's peak is known, as gpt-train writes them. Under DDP the tokens are every
    rank's, and MFU is per GPU."""

    def __init__(self, model, device, world_size: int = 1):
        self.flops_per_token = flops_per_token(model)
        self.card = card_name(device)
        self.peak = peak_bf16_flops(self.card)
        self.world_size = world_size

    def basis(self) -> str:
        """One log line: what MFU is measured against, or why there is none."""
        if self.card is None:
            return "speed: tokens/s (MFU is reported on a GPU only)"
        if self.peak is None:
            return f"speed: tokens/s; MFU not reported: unknown card ({self.card}), its peak bf16 rate is not known"
        return (f"speed: tokens/s and MFU ({self.flops_per_token / 1e6:.1f} MFLOP per token, nanoGPT's count) "
                f"against the {self.card}'s peak bf16 rate, {self.peak / 1e12:.0f} TFLOP/s")

    def mfu(self, tokens_per_s: float) -> float | None:
        if self.peak is None:
            return None
        return tokens_per_s * self.flops_per_token / self.world_size / self.peak

    def describe(self, tokens_per_s: float) -> str:
        """'123,456 tokens/s, MFU 12.3%' (without MFU when the peak is not known)."""
        mfu = self.mfu(tokens_per_s)
        return f"{tokens_per_s:,.0f} tokens/s" + ("" if mfu is None else f", MFU {mfu:.1%}")
