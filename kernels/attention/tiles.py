"""Launch tiles of the attention kernels: block sizes, warps and stages per input precision, head size, kernel,
dropout, GPU architecture and operand alignment; and the dropout-mask kernel's block.

The dK/dV kernel holds BLOCK_N keys and streams BLOCK_M queries; the others hold BLOCK_M queries and stream
BLOCK_N keys. dK and dV are computed by one launch ("dkdv") or, where no tile for it fits, by two, "dk" and "dv"
(see key_block_passes). Every tile the tables can give is compiled for each architecture in
kernels._gpu.CHECKED_ARCHS, aligned and not, by tools/tiles/ (python -m tools.tiles.report), which fails on spills
(fp32: beyond a few words), excess shared memory or, on sm_90, matrix products that miss wgmma or repeat work across
warpgroups; tools.tiles.search finds a clean replacement for a tile that fails, and ranks the headline launches'
tiles by the speed model (--rank).
"""

from collections import namedtuple
from dataclasses import dataclass
from typing import Optional

import torch

from .._gpu import device_arch
from .._library import next_power_of_2

Tile = namedtuple("Tile", "block_m block_n num_warps num_stages")

MAX_HEAD_SIZE = 256


@dataclass(frozen=True)
class TileRule:
    """The tile of the launches a rule matches: each key field given must equal the launch's; None matches any.
    Exactly one rule matches each launch (tests/test_attention_launch.py checks every key)."""

    precision: str  # "16bit" (fp16, bf16) or "fp32"
    head: int  # BLOCK_D: the head size padded to a power of two
    kernel: str  # "forward", "dkdv" (or "dk" and "dv", see key_block_passes), "dq"
    tile: Tile
    why: str
    dropout: Optional[bool] = None
    arch: Optional[int] = None  # 90 for sm_90; 80 stands for every other architecture
    aligned: Optional[bool] = None  # every operand 16-byte aligned (shared.operands_aligned)
    # How the tile was chosen: "timed" (fastest on a GPU under tools.tiles.tune), "model" (the fewest clocks under
    # the speed model, tools.tiles.search --rank; untimed) or "fit" (the largest tile that compiles cleanly).
    chosen_by: str = "fit"

    def matches(self, precision, head, kernel, dropout, arch, aligned):
        return (self.precision, self.head, self.kernel) == (precision, head, kernel) and all(
            want is None or want == have
            for want, have in ((self.dropout, dropout), (self.arch, arch), (self.aligned, aligned)))


# Hopper first: 16-bit tiles whose matrix-product rows (BLOCK_M; BLOCK_N for dK/dV) are 64 per warpgroup of 4 warps
# become wgmma on sm_90 (fewer rows per warpgroup would repeat work across warpgroups); the same tiles run mma.sync
# elsewhere. Every 16-bit tile compiles without register spills for its architectures, aligned or not as it says,
# under every mask and with dropout or without as it says (the compile report); where a tile spilled in the
# windowed, packed variant, the replacement is tools.tiles.search's, which holds the most rows that fit. Tiles
# chosen_by="timed" won tools.tiles.tune on an H200 (bench/results/nvidia-h200/tiles.md, bf16 causal, aligned): each is
# the fastest spill-free candidate there, its gain over the tile it replaced in brackets; where the speed model
# ranks another tile first (bench/results/compile_report.md lists both), timing wins. Tiles chosen_by="model" are
# the model's best clean tile, untimed. Misaligned operands are loaded
# element by element through registers, which costs registers. fp32 is multiplied in true fp32 without tensor
# cores, whose operands are register-hungry: small tiles, a few spilled words allowed
# (tools.tiles.checks.FP32_SPILL_ALLOWANCE_BYTES).
RULES = [
    TileRule("16bit", 16, "forward", Tile(128, 64, 8, 3), "the largest spill-free tile"),
    TileRule("16bit", 16, "dkdv", Tile(32, 128, 8, 3), "the largest spill-free tile"),
    TileRule("16bit", 16, "dq", Tile(128, 64, 8, 3), "the largest spill-free tile", dropout=True),
    TileRule("16bit", 16, "dq", Tile(128, 64, 8, 3), "the largest spill-free tile", dropout=False, arch=90),
    TileRule("16bit", 16, "dq", Tile(128, 64, 4, 3), "8 warps spill misaligned", dropout=False, arch=80),
    TileRule("16bit", 32, "forward", Tile(128, 64, 8, 3), "as head size 16"),
    TileRule("16bit", 32, "dkdv", Tile(32, 128, 8, 3), "as head size 16"),
    TileRule("16bit", 32, "dq", Tile(128, 64, 8, 3), "as head size 16", arch=90),
    TileRule("16bit", 32, "dq", Tile(128, 64, 8, 2), "3 stages spill with dropout", arch=80),
    TileRule("16bit", 64, "forward", Tile(64, 64, 4, 3), "timed on sm_90 (1.04x)", arch=90, aligned=True,
             chosen_by="timed"),
    TileRule("16bit", 64, "forward", Tile(128, 64, 8, 3), "the largest spill-free tile", arch=80, aligned=True),
    TileRule("16bit", 64, "forward", Tile(128, 32, 8, 3), "misaligned: 64 keys per step spill", aligned=False),
    TileRule("16bit", 64, "dkdv", Tile(32, 64, 4, 2), "timed on sm_90 (1.61x)", arch=90, aligned=True,
             chosen_by="timed"),
    TileRule("16bit", 64, "dkdv", Tile(16, 128, 8, 2), "untimed: the largest spill-free tile", arch=90,
             aligned=False),
    TileRule("16bit", 64, "dkdv", Tile(16, 128, 8, 2), "the largest spill-free tile", arch=80),
    TileRule("16bit", 64, "dq", Tile(64, 64, 4, 2), "timed on sm_90 (1.07x)", arch=90, aligned=True,
             chosen_by="timed"),
    TileRule("16bit", 64, "dq", Tile(128, 32, 8, 3), "untimed: 64 keys per step spill with dropout", arch=90,
             aligned=False),
    TileRule("16bit", 64, "dq", Tile(128, 32, 8, 3), "64 keys per step spill with dropout", arch=80),
    TileRule("16bit", 128, "forward", Tile(128, 64, 8, 3), "timed on sm_90 (1.22x)", arch=90, aligned=True,
             chosen_by="timed"),
    TileRule("16bit", 128, "forward", Tile(128, 16, 8, 3), "untimed: 32 keys per step spill", dropout=False,
             arch=90, aligned=False),
    TileRule("16bit", 128, "forward", Tile(128, 32, 8, 3), "untimed: 16 keys per step spill", dropout=True,
             arch=90, aligned=False),
    TileRule("16bit", 128, "forward", Tile(128, 32, 8, 3), "the largest spill-free tile", arch=80, aligned=True),
    TileRule("16bit", 128, "forward", Tile(128, 16, 8, 3), "misaligned: 32 keys per step spill", arch=80,
             aligned=False),
    # Head size 128's dK and dV: on sm_90 with aligned operands in one launch, whose two 64 x 128 fp32 accumulators
    # per warpgroup leave room for 16 or 32 queries per step (the model puts it about 25% ahead of two launches,
    # with dropout and without). Elsewhere in two launches, "dk" and "dv" (key_block_passes), each recomputing P:
    # misaligned, no fused tile is spill-free; on sm_80, with no model and no timing to choose by, the pair stays
    # (fused tiles fit there too, 16 x 128 unpipelined or with dropout 64 x 64, untried). Those tiles are
    # tools.tiles.search's: the spill-free tile holding the most keys that serves every variant.
    TileRule("16bit", 128, "dkdv", Tile(32, 128, 8, 1), "the fewest modelled clocks (4608; dK + dV apart 6144)",
             dropout=False, arch=90, aligned=True, chosen_by="model"),
    TileRule("16bit", 128, "dkdv", Tile(16, 128, 8, 3), "dropout: the most keys spill-free (8384 modelled "
             "clocks; dK + dV apart 10912)", dropout=True, arch=90, aligned=True),
    TileRule("16bit", 128, "dk", Tile(64, 32, 8, 3), "untimed: 64 keys spill misaligned", arch=90, aligned=False),
    TileRule("16bit", 128, "dk", Tile(64, 32, 8, 3), "64 keys spill in some variant", arch=80),
    TileRule("16bit", 128, "dv", Tile(16, 128, 8, 3), "untimed: the most keys spill-free", arch=90, aligned=False),
    TileRule("16bit", 128, "dv", Tile(16, 128, 8, 3), "the most keys spill-free", arch=80),
    TileRule("16bit", 128, "dq", Tile(128, 64, 8, 2), "timed on sm_90 (1.17x)", dropout=False, arch=90, aligned=True,
             chosen_by="timed"),
    TileRule("16bit", 128, "dq", Tile(128, 32, 8, 2), "dropout: 64 keys per step spill", dropout=True, arch=90,
             aligned=True),
    TileRule("16bit", 128, "dq", Tile(32, 64, 8, 3), "untimed: 128 and 64 queries spill or repeat work", arch=90,
             aligned=False),
    TileRule("16bit", 128, "dq", Tile(64, 32, 8, 2), "the largest spill-free tile", dropout=False, arch=80),
    TileRule("16bit", 128, "dq", Tile(64, 32, 8, 3), "dropout: 128 queries spill misaligned", dropout=True,
             arch=80),
    # Head size 256 on sm_90 with aligned operands: wgmma tiles of two warpgroups, each holding a 64 x 256 fp32
    # accumulator (128 registers per thread) against 16 or 32 streamed rows. Misaligned, every wgmma tile tried
    # spills (the streamed tiles pass through registers), so those launches keep mma.sync tiles. Registers are
    # so tight here that a stage or a warp more or less decides the spill: each tile below is tools.tiles.search's.
    TileRule("16bit", 256, "forward", Tile(128, 32, 8, 2), "wgmma", dropout=False, arch=90, aligned=True),
    TileRule("16bit", 256, "forward", Tile(128, 16, 8, 3), "wgmma; dropout: 32 keys per step spill", dropout=True,
             arch=90, aligned=True),
    TileRule("16bit", 256, "forward", Tile(32, 32, 4, 2), "the largest spill-free tile", arch=80, aligned=True),
    TileRule("16bit", 256, "forward", Tile(32, 16, 8, 3), "misaligned: 32 keys per step spill", aligned=False),
    TileRule("16bit", 256, "dk", Tile(32, 128, 8, 2), "wgmma", dropout=False, arch=90, aligned=True),
    TileRule("16bit", 256, "dk", Tile(16, 128, 8, 3), "wgmma; dropout: 32 queries per step spill", dropout=True,
             arch=90, aligned=True),
    TileRule("16bit", 256, "dk", Tile(16, 32, 8, 1), "misaligned: no wgmma tile fits", dropout=False,
             aligned=False),
    TileRule("16bit", 256, "dk", Tile(16, 32, 4, 3), "8 warps spill", dropout=False, arch=80, aligned=True),
    TileRule("16bit", 256, "dk", Tile(16, 16, 8, 1), "dropout: 32 keys spill; 3 stages spill", dropout=True,
             arch=90, aligned=False),
    TileRule("16bit", 256, "dk", Tile(16, 16, 8, 3), "dropout: 32 keys spill; 1 stage spills", dropout=True,
             arch=80),
    TileRule("16bit", 256, "dv", Tile(32, 128, 8, 2), "wgmma", dropout=False, arch=90, aligned=True),
    TileRule("16bit", 256, "dv", Tile(16, 128, 8, 3), "wgmma; dropout: 32 queries per step spill", dropout=True,
             arch=90, aligned=True),
    TileRule("16bit", 256, "dv", Tile(32, 32, 8, 1), "misaligned: no wgmma tile fits; 16 keys repeat work",
             arch=90, aligned=False),
    TileRule("16bit", 256, "dv", Tile(16, 64, 8, 2), "the largest spill-free tile", arch=80),
    TileRule("16bit", 256, "dq", Tile(128, 16, 8, 2), "wgmma", arch=90, aligned=True),
    TileRule("16bit", 256, "dq", Tile(16, 32, 8, 3), "misaligned: no wgmma tile fits", arch=90, aligned=False),
    TileRule("16bit", 256, "dq", Tile(16, 32, 8, 3), "the largest spill-free tile in every variant", arch=80),
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
# The dropout-mask kernel (attention_dropout_mask: tests and inspection, not speed) writes square tiles of this
# many queries and keys on a GPU, the interpreter's BLOCK_M on CPU; a multiple of 4, as Philox draws four keys.
DROPOUT_MASK_BLOCK = 64


def block_d(head_dim):
    """The head size padded to a power of two, at least 16 (the smallest tl.dot)."""
    return max(16, next_power_of_2(head_dim))


def key_block_passes(head_dim, dtype, dropout, arch, aligned):
    """The launches of the dK/dV kernel: one computing both ("dkdv") where the table has a tile for it, else one
    for dK and one for dV ("dk", "dv"), each recomputing P: one more Q K^T product per key block (5 instead of 4)
    for half the accumulators. Two (BLOCK_N x D) fp32 accumulators at the 64 key rows per warpgroup that wgmma
    needs are D registers per thread: at head size 256 they alone exceed the 255 a thread has, at 128 they leave
    room for small tiles only (the table says where)."""
    fused = _launch_key("dkdv", head_dim, dtype, dropout, arch, aligned)
    return ("dkdv",) if any(rule.matches(*fused) for rule in RULES) else ("dk", "dv")


def preprocess_block_m(padded_head_dim, dtype):
    """Rows per program of the delta kernel: 8192 16-bit elements of O and of dO per 4 warps stay in registers,
    4096 fp32 ones (8192 spill)."""
    elements = 4096 if dtype == torch.float32 else 8192
    return min(64, elements // padded_head_dim)


def precision(dtype):
    """The precision class a table keys on: \"fp32\", or \"16bit\" for fp16 and bf16 alike."""
    return "fp32" if dtype == torch.float32 else "16bit"


_LAUNCH_KEY_FIELDS = ("precision", "head", "kernel", "dropout", "arch", "aligned")


def _launch_key(kernel, head_dim, dtype, dropout, arch, aligned):
    """What a TileRule matches: 90 stands for sm_90, 80 for every other architecture (the general tiles)."""
    return precision(dtype), block_d(head_dim), kernel, dropout, 90 if arch == 90 else 80, aligned


def table_tile(kernel, head_dim, dtype, dropout, arch, aligned):
    """The tile `kernel` runs on `arch` (90 for sm_90; every other arch gets the general tiles, made for sm_80).
    A launch no rule matches is a LookupError naming its key."""
    launch = _launch_key(kernel, head_dim, dtype, dropout, arch, aligned)
    tile = next((rule.tile for rule in RULES if rule.matches(*launch)), None)
    if tile is None:
        key = ", ".join(f"{field}={value!r}" for field, value in zip(_LAUNCH_KEY_FIELDS, launch))
        raise LookupError(f"no attention tile rule matches the launch ({key})")
    return tile


def launch_tile(kernel, head_dim, dtype, dropout, device, aligned):
    """The tile for `kernel` ("forward", "dkdv", "dk", "dv" or "dq") on `device`, for operands that are
    `aligned` (kernels.operands_aligned) or not. GPUs older than Ampere have less shared memory: no software
    pipelining there."""
    if device.type != "cuda":
        return INTERPRETER_TILE
    tile = table_tile(kernel, head_dim, dtype, dropout, device_arch(device), aligned)
    return tile._replace(num_stages=1) if device_arch(device) < 80 else tile


def launch_passes(head_dim, dtype, dropout, device, aligned):
    """key_block_passes for `device`. The interpreter takes sm_90's, so that the CPU tests run both the fused and
    the split launches (at head size 128, as operands and dropout decide)."""
    return key_block_passes(head_dim, dtype, dropout, device_arch(device) if device.type == "cuda" else 90, aligned)


def dropout_mask_block(device):
    """Queries and keys per program of the dropout-mask kernel on `device`."""
    return DROPOUT_MASK_BLOCK if device.type == "cuda" else INTERPRETER_TILE.block_m
