"""Launch tiles of the attention kernels: block sizes, warps and stages per input precision, head size, kernel,
dropout, GPU architecture and operand alignment.

The dK/dV kernel holds BLOCK_N keys and streams BLOCK_M queries; the others hold BLOCK_M queries and stream
BLOCK_N keys. At head size 256 dK and dV are computed by two launches, "dk" and "dv" (see key_block_passes).
Every tile the tables can give is compiled for each architecture in kernels._gpu.CHECKED_ARCHS, aligned and not,
by bench/compile_report.py, which fails on spills, excess shared memory or, on sm_90, matrix products that miss
wgmma.
"""

from collections import namedtuple
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from .._gpu import device_arch

Tile = namedtuple("Tile", "block_m block_n num_warps num_stages")

MAX_HEAD_SIZE = 256


@dataclass(frozen=True)
class TileRule:
    """The tile of the launches a rule matches: each key field given must equal the launch's; None matches any.
    Exactly one rule matches each launch (tests/test_attention_launch.py checks every key)."""

    precision: str  # "16bit" (fp16, bf16) or "fp32"
    head: int  # BLOCK_D: the head size padded to a power of two
    kernel: str  # "forward", "dkdv" (or "dk" and "dv" at head size 256), "dq"
    tile: Tile
    why: str
    dropout: Optional[bool] = None
    arch: Optional[int] = None  # 90 for sm_90; 80 stands for every other architecture
    aligned: Optional[bool] = None  # every operand 16-byte aligned (shared.operands_aligned)

    def matches(self, precision, head, kernel, dropout, arch, aligned):
        return (self.precision, self.head, self.kernel) == (precision, head, kernel) and all(
            want is None or want == have
            for want, have in ((self.dropout, dropout), (self.arch, arch), (self.aligned, aligned)))


# Hopper first: 16-bit tiles whose matrix-product rows (BLOCK_M; BLOCK_N for dK/dV) are 64 per warpgroup of 4 warps
# become wgmma on sm_90 (fewer rows per warpgroup would repeat work across warpgroups); the same tiles run mma.sync
# elsewhere. Every tile compiles without register spills for its architectures, aligned or not as it says (the
# compile report). "Timed" tiles won bench.tune on an H200 (bench/results/nvidia-h200/tiles.md, bf16 causal,
# aligned): each is the fastest spill-free candidate there, its gain over the tile it replaced in brackets.
# Misaligned operands are loaded element by element through registers, which costs registers. fp32 is multiplied
# in true fp32 without tensor cores, whose operands are register-hungry: small tiles.
RULES = [
    TileRule("16bit", 16, "forward", Tile(128, 64, 8, 3), "the largest spill-free tile"),
    TileRule("16bit", 16, "dkdv", Tile(32, 128, 8, 3), "the largest spill-free tile"),
    TileRule("16bit", 16, "dq", Tile(128, 64, 8, 3), "the largest spill-free tile"),
    TileRule("16bit", 32, "forward", Tile(128, 64, 8, 3), "as head size 16"),
    TileRule("16bit", 32, "dkdv", Tile(32, 128, 8, 3), "as head size 16"),
    TileRule("16bit", 32, "dq", Tile(128, 64, 8, 3), "as head size 16"),
    TileRule("16bit", 64, "forward", Tile(64, 64, 4, 3), "timed on sm_90 (1.04x)", arch=90, aligned=True),
    TileRule("16bit", 64, "forward", Tile(128, 64, 8, 3), "untimed: the largest spill-free tile", arch=90,
             aligned=False),
    TileRule("16bit", 64, "forward", Tile(128, 64, 8, 3), "the largest spill-free tile", arch=80),
    TileRule("16bit", 64, "dkdv", Tile(32, 64, 4, 2), "timed on sm_90 (1.61x)", arch=90, aligned=True),
    TileRule("16bit", 64, "dkdv", Tile(16, 128, 8, 2), "untimed: the largest spill-free tile", arch=90,
             aligned=False),
    TileRule("16bit", 64, "dkdv", Tile(16, 128, 8, 2), "the largest spill-free tile", arch=80),
    TileRule("16bit", 64, "dq", Tile(64, 64, 4, 2), "timed on sm_90 (1.07x)", arch=90, aligned=True),
    TileRule("16bit", 64, "dq", Tile(128, 64, 8, 3), "untimed: the largest spill-free tile", arch=90, aligned=False),
    TileRule("16bit", 64, "dq", Tile(128, 64, 8, 3), "the largest spill-free tile", arch=80),
    TileRule("16bit", 128, "forward", Tile(128, 64, 8, 3), "timed on sm_90 (1.22x)", arch=90, aligned=True),
    TileRule("16bit", 128, "forward", Tile(128, 32, 8, 3), "untimed: the largest spill-free tile", arch=90,
             aligned=False),
    TileRule("16bit", 128, "forward", Tile(128, 32, 8, 3), "the largest spill-free tile", arch=80),
    # Head size 128's dK and dV in two launches (key_block_passes): one 64 x 128 fp32 accumulator per warpgroup
    # leaves the registers for 64 keys x 64 or 128 queries per step, fewer shared-memory reads per product, where
    # the two together spilled in the windowed, packed variant; the model puts the pair 8% behind a fused launch
    # that would fit.
    TileRule("16bit", 128, "dk", Tile(64, 128, 8, 2), "model: the fewest clocks spill-free", dropout=False, arch=90,
             aligned=True),
    TileRule("16bit", 128, "dk", Tile(32, 64, 4, 2), "dropout: 64 queries per step spill", dropout=True, arch=90,
             aligned=True),
    TileRule("16bit", 128, "dk", Tile(32, 64, 4, 2), "untimed: the general tile", arch=90, aligned=False),
    TileRule("16bit", 128, "dk", Tile(32, 64, 4, 2), "one accumulator: the old fused tile's rows", arch=80),
    TileRule("16bit", 128, "dv", Tile(64, 128, 8, 2), "model: the fewest clocks spill-free", dropout=False, arch=90,
             aligned=True),
    TileRule("16bit", 128, "dv", Tile(32, 64, 4, 2), "dropout: 64 queries per step spill", dropout=True, arch=90,
             aligned=True),
    TileRule("16bit", 128, "dv", Tile(32, 64, 4, 2), "untimed: the general tile", arch=90, aligned=False),
    TileRule("16bit", 128, "dv", Tile(32, 64, 4, 2), "one accumulator: the old fused tile's rows", arch=80),
    TileRule("16bit", 128, "dq", Tile(128, 64, 8, 2), "timed on sm_90 (1.17x)", dropout=False, arch=90, aligned=True),
    TileRule("16bit", 128, "dq", Tile(128, 32, 8, 2), "dropout: 64 keys per step spill", dropout=True, arch=90,
             aligned=True),
    TileRule("16bit", 128, "dq", Tile(64, 32, 8, 2), "untimed: the largest spill-free tile", dropout=False, arch=90,
             aligned=False),
    TileRule("16bit", 128, "dq", Tile(64, 32, 8, 2), "the largest spill-free tile", dropout=False, arch=80),
    TileRule("16bit", 128, "dq", Tile(128, 16, 8, 2), "dropout: fewer keys per step", dropout=True, arch=90,
             aligned=False),
    TileRule("16bit", 128, "dq", Tile(128, 16, 8, 2), "dropout: fewer keys per step", dropout=True, arch=80),
    # Head size 256 on sm_90 with aligned operands: wgmma tiles of two warpgroups, each holding a 64 x 256 fp32
    # accumulator (128 registers per thread) against 16 or 32 streamed rows. Misaligned, every wgmma tile tried
    # spills (the streamed tiles pass through registers), so those launches keep mma.sync tiles.
    TileRule("16bit", 256, "forward", Tile(128, 32, 8, 2), "wgmma", arch=90, aligned=True),
    TileRule("16bit", 256, "forward", Tile(32, 32, 4, 2), "misaligned: no wgmma tile fits", arch=90, aligned=False),
    TileRule("16bit", 256, "forward", Tile(32, 32, 4, 2), "the largest spill-free tile", arch=80),
    TileRule("16bit", 256, "dk", Tile(32, 128, 8, 2), "wgmma", arch=90, aligned=True),
    TileRule("16bit", 256, "dk", Tile(16, 32, 8, 1), "misaligned: no wgmma tile fits", dropout=False, arch=90,
             aligned=False),
    TileRule("16bit", 256, "dk", Tile(16, 32, 8, 1), "the largest spill-free tile", dropout=False, arch=80),
    TileRule("16bit", 256, "dk", Tile(16, 16, 8, 1), "dropout: 32 queries per step spill", dropout=True, arch=90,
             aligned=False),
    TileRule("16bit", 256, "dk", Tile(16, 16, 8, 1), "dropout: 32 queries per step spill", dropout=True, arch=80),
    TileRule("16bit", 256, "dv", Tile(32, 128, 8, 2), "wgmma", arch=90, aligned=True),
    TileRule("16bit", 256, "dv", Tile(16, 64, 8, 2), "misaligned: no wgmma tile fits", arch=90, aligned=False),
    TileRule("16bit", 256, "dv", Tile(16, 64, 8, 2), "the largest spill-free tile", arch=80),
    TileRule("16bit", 256, "dq", Tile(128, 16, 8, 2), "wgmma", arch=90, aligned=True),
    TileRule("16bit", 256, "dq", Tile(32, 16, 8, 2), "misaligned: no wgmma tile fits", arch=90, aligned=False),
    TileRule("16bit", 256, "dq", Tile(32, 16, 8, 2), "the largest spill-free tile", arch=80),
    TileRule("fp32", 16, "forward", Tile(32, 32, 4, 1), "fp32 operands"),
    TileRule("fp32", 16, "dkdv", Tile(16, 32, 8, 1), "fp32 operands"),
    TileRule("fp32", 16, "dq", Tile(32, 32, 8, 1), "fp32 operands"),
    TileRule("fp32", 32, "forward", Tile(32, 32, 4, 1), "fp32 operands"),
    TileRule("fp32", 32, "dkdv", Tile(16, 32, 8, 1), "fp32 operands"),
    TileRule("fp32", 32, "dq", Tile(32, 32, 4, 1), "fp32 operands; 8 warps spill"),
    TileRule("fp32", 64, "forward", Tile(32, 16, 4, 1), "fp32 operands"),
    TileRule("fp32", 64, "dkdv", Tile(32, 16, 8, 1), "fp32 operands"),
    TileRule("fp32", 64, "dq", Tile(32, 32, 8, 1), "fp32 operands"),
    TileRule("fp32", 128, "forward", Tile(32, 16, 8, 1), "fp32 operands"),
    TileRule("fp32", 128, "dk", Tile(16, 16, 8, 1), "fp32 operands"),
    TileRule("fp32", 128, "dv", Tile(16, 16, 8, 1), "fp32 operands"),
    TileRule("fp32", 128, "dq", Tile(16, 16, 8, 1), "fp32 operands"),
    TileRule("fp32", 256, "forward", Tile(16, 16, 4, 1), "fp32 operands"),
    TileRule("fp32", 256, "dk", Tile(16, 16, 8, 1), "fp32 operands"),
    TileRule("fp32", 256, "dv", Tile(16, 16, 4, 1), "fp32 operands", dropout=False),
    TileRule("fp32", 256, "dv", Tile(16, 16, 8, 1), "dropout: 4 warps spill", dropout=True),
    TileRule("fp32", 256, "dq", Tile(16, 32, 8, 1), "fp32 operands"),
]
# The CPU interpreter gets small blocks: its cost grows with the number of elements computed, masked or not.
INTERPRETER_TILE = Tile(32, 32, 1, 1)
# Which gradients each key-block launch computes: (COMPUTE_DK, COMPUTE_DV).
COMPUTED_GRADIENTS = {"dkdv": (True, True), "dk": (True, False), "dv": (False, True)}


def block_d(head_dim):
    """The head size padded to a power of two, at least 16 (the smallest tl.dot)."""
    return max(16, triton.next_power_of_2(head_dim))


def key_block_passes(padded_head_dim):
    """The launches of the dK/dV kernel: one computing both, or from head size 128 one for dK and one for dV, each
    recomputing P. Two (BLOCK_N x D) fp32 accumulators at the 64 key rows per warpgroup that wgmma needs are
    D registers per thread: at 256 they alone exceed the 255 a thread has, at 128 they leave too few for tiles that
    keep the tensor cores fed. The split costs one more Q K^T product per key block (5 products instead of 4)."""
    return ("dk", "dv") if padded_head_dim >= 128 else ("dkdv",)


def preprocess_block_m(padded_head_dim):
    """Rows per program of the delta kernel: 8192 elements of O and of dO per 4 warps stay in registers."""
    return min(64, 8192 // padded_head_dim)


def _precision(dtype):
    return "fp32" if dtype == torch.float32 else "16bit"


def table_tile(kernel, head_dim, dtype, dropout, arch, aligned):
    """The tile `kernel` runs on `arch` (90 for sm_90; every other arch gets the general tiles, made for sm_80)."""
    launch = (_precision(dtype), block_d(head_dim), kernel, dropout, 90 if arch == 90 else 80, aligned)
    return next(rule.tile for rule in RULES if rule.matches(*launch))


def launch_tile(kernel, head_dim, dtype, dropout, device, aligned):
    """The tile for `kernel` ("forward", "dkdv", "dk", "dv" or "dq") on `device`, for operands that are
    `aligned` (kernels.operands_aligned) or not. GPUs older than Ampere have less shared memory: no software
    pipelining there."""
    if device.type != "cuda":
        return INTERPRETER_TILE
    tile = table_tile(kernel, head_dim, dtype, dropout, device_arch(device), aligned)
    return tile._replace(num_stages=1) if device_arch(device) < 80 else tile
