"""Launch tiles of the attention kernels: block sizes, warps and stages per input precision, head size, kernel
(the forward, or the backward launch of dK, dV and dQ), dropout, GPU architecture and operand alignment; the delta
kernel's rows; and the dropout-mask kernel's block.

The forward holds BLOCK_M queries per program and streams BLOCK_N keys per step. The backward launch's key
programs hold block_n1 keys and stream block_m1 queries; its query programs hold block_m2 queries and stream
block_n2 keys; dK and dV are computed by the same program, or where their two fp32 accumulators do not fit
together by programs of their own (dk_dv_apart), and where even one whole-head accumulator does not fit, in
head_slices column slices of the head by programs of their own. Every tile the table can give is compiled for
each architecture in kernels._gpu.CHECKED_ARCHS, aligned and not, by the compile report (python -m
tools.tiles.report), which fails on spills (fp32: beyond a few words), excess shared memory or, on sm_90, matrix
products that miss wgmma or repeat work across warpgroups; tools.tiles.search finds a clean replacement for a tile
that fails.

Triton's interpreter (CPU) runs the tiles an sm_90 card would: its cost is per program and per operation far more
than per element, so the GPU's large tiles cost it no more than small ones, and the CPU tests check the band
arithmetic at the block shapes a GPU runs. The tests force every other shipped shape through override().
"""

from collections import namedtuple

import torch

from .._gpu import device_arch
from .._library import next_power_of_2
from .._tiles import TileRule, TileTable

Tile = namedtuple("Tile", "block_m block_n num_warps num_stages")
BackwardTile = namedtuple("BackwardTile", "block_m1 block_n1 block_m2 block_n2 num_warps num_stages dk_dv_apart "
                          "head_slices", defaults=(1,))

MAX_HEAD_SIZE = 256
# What the launch tiles are keyed by. arch: 90 for sm_90, 80 for every other architecture (the general tiles).
# aligned: every operand 16-byte aligned (shared.operands_aligned).
FIELDS = ("precision", "head", "kernel", "dropout", "arch", "aligned")
# The arch whose tiles Triton's interpreter runs.
INTERPRETER_ARCH = 90


def _rule(precision, head, kernel, tile, why, chosen_by="fit", **match):
    return TileRule(dict(precision=precision, head=head, kernel=kernel, **match), tile, why, chosen_by)


# Hopper first: 16-bit tiles whose matrix-product rows (BLOCK_M, block_n1, block_m2) are 64 per warpgroup of 4
# warps become wgmma on sm_90 (fewer rows per warpgroup would repeat work across warpgroups); the same tiles run
# mma.sync elsewhere. Every 16-bit tile compiles without register spills for its architectures, aligned or not as
# it says, under every mask and with dropout or without as it says (the compile report). chosen_by: "flex" is
# FlexAttention's sm_90 tile (torch/_inductor/template_heuristics/triton.py), shipped until a GPU times the
# candidates; "timed" won the tuner on an H200 (bench/results/nvidia-h200/tiles.md), its gain in brackets; "fit"
# the largest tile found that compiles cleanly. Misaligned operands are loaded element by element through
# registers, which costs registers. fp32 is multiplied in true fp32 without tensor cores, whose operands are
# register-hungry: small tiles, a few spilled words allowed (the compile report's fp32 allowance).
_FORWARD = [
    _rule("16bit", 16, "forward", Tile(128, 64, 8, 3), "the largest spill-free tile"),
    _rule("16bit", 32, "forward", Tile(128, 64, 8, 3), "as head size 16"),
    _rule("16bit", 64, "forward", Tile(128, 128, 8, 3), "FlexAttention's sm_90 tile at 8 warps: its 4 spill", "flex",
          arch=90, aligned=True),
    _rule("16bit", 64, "forward", Tile(128, 64, 8, 3), "the largest spill-free tile", arch=80, aligned=True),
    _rule("16bit", 64, "forward", Tile(128, 32, 8, 3), "misaligned: 64 keys per step spill", aligned=False),
    _rule("16bit", 128, "forward", Tile(128, 64, 8, 3), "timed on sm_90 (1.22x); FlexAttention's sm_90 tile too",
          "timed", arch=90, aligned=True),
    _rule("16bit", 128, "forward", Tile(128, 16, 8, 3), "untimed: 32 keys per step spill", dropout=False, arch=90,
          aligned=False),
    _rule("16bit", 128, "forward", Tile(128, 32, 8, 3), "untimed: 16 keys per step spill", dropout=True, arch=90,
          aligned=False),
    _rule("16bit", 128, "forward", Tile(128, 32, 8, 3), "the largest spill-free tile", arch=80, aligned=True),
    _rule("16bit", 128, "forward", Tile(128, 16, 8, 3), "misaligned: 32 keys per step spill", arch=80,
          aligned=False),
    # Head size 256 on sm_90 with aligned operands: wgmma tiles of two warpgroups, each holding a 64 x 256 fp32
    # accumulator (128 registers per thread) against 16 or 32 streamed rows. Misaligned, every wgmma tile tried
    # spills (the streamed tiles pass through registers), so those launches keep mma.sync tiles.
    _rule("16bit", 256, "forward", Tile(128, 32, 8, 2), "wgmma", dropout=False, arch=90, aligned=True),
    _rule("16bit", 256, "forward", Tile(128, 16, 8, 3), "wgmma; dropout: 32 keys per step spill", dropout=True,
          arch=90, aligned=True),
    _rule("16bit", 256, "forward", Tile(32, 32, 4, 2), "the largest spill-free tile", arch=80, aligned=True),
    _rule("16bit", 256, "forward", Tile(32, 16, 8, 3), "misaligned: 32 keys per step spill", aligned=False),
    _rule("fp32", 16, "forward", Tile(32, 32, 4, 1), "fp32 operands"),
    _rule("fp32", 32, "forward", Tile(32, 32, 4, 1), "fp32 operands"),
    _rule("fp32", 64, "forward", Tile(32, 16, 4, 1), "fp32 operands"),
    _rule("fp32", 128, "forward", Tile(32, 16, 8, 1), "fp32 operands"),
    _rule("fp32", 256, "forward", Tile(16, 16, 4, 1), "fp32 operands"),
]
# The backward launch: (block_m1, block_n1) the key programs' (queries streamed, keys held), (block_m2, block_n2)
# the query programs' (queries held, keys streamed); warps and stages are the launch's, shared by both kinds.
_BACKWARD = [
    _rule("16bit", 16, "backward", BackwardTile(32, 128, 128, 64, 8, 2, False), "dropout: 3 stages spill on sm_80",
          dropout=True, arch=80),
    _rule("16bit", 16, "backward", BackwardTile(32, 128, 128, 64, 8, 3, False), "the largest spill-free tile",
          dropout=False),
    _rule("16bit", 16, "backward", BackwardTile(32, 128, 128, 64, 8, 3, False), "the largest spill-free tile",
          dropout=True, arch=90),
    _rule("16bit", 32, "backward", BackwardTile(16, 128, 128, 64, 8, 2, False), "dropout: 32 queries per key "
          "program step spill on sm_80", dropout=True, arch=80),
    _rule("16bit", 32, "backward", BackwardTile(32, 128, 128, 64, 8, 2, False), "the largest spill-free tile",
          dropout=False),
    _rule("16bit", 32, "backward", BackwardTile(32, 128, 128, 64, 8, 2, False), "the largest spill-free tile",
          dropout=True, arch=90),
    _rule("16bit", 64, "backward", BackwardTile(64, 128, 128, 64, 8, 2, False), "FlexAttention's sm_90 tile at 2 "
          "stages: 3 spill under the windowed packed mask", "flex", dropout=False, arch=90, aligned=True),
    _rule("16bit", 64, "backward", BackwardTile(64, 128, 128, 32, 8, 2, False), "FlexAttention's sm_90 tile at 2 "
          "stages streaming 32 keys per dQ step: dropout's random numbers spill 64", "flex", dropout=True, arch=90,
          aligned=True),
    _rule("16bit", 64, "backward", BackwardTile(16, 128, 128, 32, 8, 1, False), "the largest spill-free tile: 2 "
          "stages spill", arch=80),
    _rule("16bit", 64, "backward", BackwardTile(16, 128, 128, 32, 8, 2, False), "misaligned: the largest "
          "spill-free tile", arch=90, aligned=False),
    _rule("16bit", 128, "backward", BackwardTile(64, 128, 128, 64, 8, 2, True), "FlexAttention's sm_90 blocks, dK "
          "and dV apart at 2 stages: dK and dV together spill in every tile tried (the diagonal pieces' 16-row "
          "products hold their operands in registers); 3 stages spill", "flex", dropout=False, arch=90, aligned=True),
    _rule("16bit", 128, "backward", BackwardTile(32, 128, 128, 32, 8, 2, True), "FlexAttention's sm_90 blocks "
          "streaming 32 rows per step, dK and dV apart: with dropout's random numbers 64 spill", "flex",
          dropout=True, arch=90, aligned=True),
    _rule("16bit", 128, "backward", BackwardTile(16, 128, 128, 32, 8, 2, True), "misaligned, dK and dV apart: "
          "the largest spill-free wgmma tile (64 keys or queries held repeat work across warpgroups)",
          dropout=False, arch=90, aligned=False),
    _rule("16bit", 128, "backward", BackwardTile(16, 128, 128, 16, 8, 1, True), "misaligned with dropout, dK and "
          "dV apart: the only spill-free wgmma tile found (more rows per step or more stages spill)", dropout=True,
          arch=90, aligned=False),
    _rule("16bit", 128, "backward", BackwardTile(16, 64, 64, 32, 8, 2, True), "dK and dV apart: the largest "
          "spill-free tile", arch=80, aligned=True),
    _rule("16bit", 128, "backward", BackwardTile(16, 64, 64, 32, 8, 2, True), "misaligned, dK and dV apart: the "
          "largest spill-free tile", arch=80, aligned=False),
    # Head size 256 on sm_90: a key program's whole-head wgmma accumulator is 128 registers per thread, so dK and
    # dV are apart and in column slices of the head.
    _rule("16bit", 256, "backward", BackwardTile(32, 128, 128, 16, 8, 2, True, 2), "wgmma, dK and dV apart, "
          "each in two column slices: whole-head accumulators spill 344 B under the windowed packed mask",
          dropout=False, arch=90, aligned=True),
    _rule("16bit", 256, "backward", BackwardTile(16, 128, 128, 32, 8, 2, True, 4), "wgmma, dK and dV apart, "
          "each in four column slices: with dropout's random numbers two slices spill 120 B under the windowed "
          "packed mask, and four spill 8 B streaming 16 keys per dQ step", dropout=True, arch=90, aligned=True),
    _rule("16bit", 256, "backward", BackwardTile(16, 32, 16, 32, 8, 1, True), "dK and dV apart: the largest "
          "spill-free tile", arch=80, aligned=True),
    _rule("16bit", 256, "backward", BackwardTile(16, 32, 16, 32, 8, 1, True), "misaligned, dK and dV apart: no "
          "wgmma tile fits", dropout=False, aligned=False),
    _rule("16bit", 256, "backward", BackwardTile(16, 32, 32, 32, 8, 1, True, 4), "misaligned with dropout, dK and "
          "dV apart, each in four column slices: whole-head accumulators spill up to 132 B, two slices 24 B",
          dropout=True, aligned=False),
    _rule("fp32", 16, "backward", BackwardTile(16, 32, 32, 32, 8, 1, False), "fp32 operands"),
    _rule("fp32", 32, "backward", BackwardTile(16, 32, 32, 32, 8, 1, False), "fp32 operands"),
    _rule("fp32", 64, "backward", BackwardTile(32, 16, 32, 32, 8, 1, False), "fp32 operands"),
    _rule("fp32", 128, "backward", BackwardTile(16, 16, 16, 16, 8, 1, True), "fp32 operands, dK and dV apart; "
          "misaligned, within the fp32 allowance under the register cap (backward_max_registers)"),
    # fp32 head size 256: misaligned operands are copied aligned first (copies_misaligned_operands).
    _rule("fp32", 256, "backward", BackwardTile(16, 16, 16, 16, 8, 1, True), "fp32 operands, dK and dV apart: "
          "32 keys per dQ step spill past the allowance on sm_80", dropout=False, aligned=True),
    _rule("fp32", 256, "backward", BackwardTile(16, 16, 16, 32, 8, 1, True), "fp32 operands, dK and dV apart: "
          "16 keys per dQ step spill past the allowance on sm_90", dropout=True, aligned=True),
]
TABLE = TileTable("attention", FIELDS, _FORWARD + _BACKWARD)

# The dropout-mask kernel (attention_dropout_mask: tests and inspection, not speed) writes square tiles of queries
# and keys, a multiple of 4 keys wide (Philox draws four keys at a time).
DROPOUT_MASK_TABLE = TileTable("dropout mask", ("arch",), [
    TileRule({}, Tile(64, 64, 4, 1), "a plain store of booleans: any tile serves"),
])


def block_d(head_dim):
    """The head size padded to a power of two, at least 16 (the smallest tl.dot)."""
    return max(16, next_power_of_2(head_dim))


def head_slices(tile, head_dim):
    """The column slices a backward launch at `tile` splits dK and dV into at this head size: the tile's, but none
    narrower than 16 columns (the smallest tl.dot), which only a tile forced onto a small head would ask for."""
    return min(tile.head_slices, block_d(head_dim) // 16)


# Left to itself, ptxas compiles the fp32 backward at head size 128 with misaligned operands into 128 registers a
# thread (of the 255 a thread of 8 warps may have) and spills past the compile report's fp32 allowance: its FMA
# products hold whole head-size rows per thread. Capped at 255 instead (Triton's maxnreg), it keeps them in
# registers: at most 88 B spill under any mask. Aligned operands fit in fewer registers uncapped (more programs per
# SM); at head size 256 ptxas takes 255 unasked.
FP32_BACKWARD_MAX_REGISTERS_HEAD = 128


def backward_max_registers(head_dim, dtype, aligned):
    """The register cap (Triton's maxnreg) the backward launch compiles with: 255 for fp32 at padded head size
    FP32_BACKWARD_MAX_REGISTERS_HEAD with misaligned operands, else None (ptxas's own choice)."""
    if dtype == torch.float32 and block_d(head_dim) == FP32_BACKWARD_MAX_REGISTERS_HEAD and not aligned:
        return 255
    return None


def copies_misaligned_operands(kernel, head_dim, precision):
    """Whether a launch of `kernel` at this head size and precision (precision(dtype)) with misaligned operands runs
    on copies of them whose rows start 16 bytes apart (as FlashAttention pads odd head sizes), so that it always
    runs an aligned tile: the fp32 backward at head size 256, whose element-by-element loads beside its FMA
    products' whole-row operands spill past the compile report's fp32 allowance under every tile and kernel variant
    tried. fp32 is the accuracy path; the copies are a few element-wise passes beside its products."""
    return kernel == "backward" and precision == "fp32" and block_d(head_dim) == MAX_HEAD_SIZE


def precision(dtype):
    """The precision class a table keys on: \"fp32\", or \"16bit\" for fp16 and bf16 alike."""
    return "fp32" if dtype == torch.float32 else "16bit"


def preprocess_block_m(padded_head_dim, dtype):
    """Rows per program of the delta kernel: 8192 16-bit elements of O and of dO per 4 warps stay in registers,
    4096 fp32 ones (8192 spill)."""
    elements = 4096 if dtype == torch.float32 else 8192
    return min(64, elements // padded_head_dim)


def table_tile(kernel, head_dim, dtype, dropout, arch, aligned):
    """The tile `kernel` ("forward" or "backward") runs on `arch` (90 for sm_90; every other arch gets the general
    tiles, made for sm_80). A launch no rule matches is a LookupError naming its key."""
    return TABLE.lookup(precision=precision(dtype), head=block_d(head_dim), kernel=kernel, dropout=dropout,
                        arch=90 if arch == 90 else 80, aligned=aligned)


def launch_arch(device):
    """The arch whose tiles a launch on `device` runs: the GPU's, or INTERPRETER_ARCH's under the interpreter."""
    return device_arch(device) if device.type == "cuda" else INTERPRETER_ARCH


def launch_tile(kernel, head_dim, dtype, dropout, device, aligned):
    """The tile for `kernel` on `device`, for operands that are `aligned` (shared.operands_aligned) or not."""
    return table_tile(kernel, head_dim, dtype, dropout, launch_arch(device), aligned)


def override(tile, **match):
    """`with override(tile, **match):` every launch whose key fields (FIELDS) equal `match` runs `tile` inside the
    block, the latest override winning: how tools.tiles.tune times a candidate and the CPU tests force a shape."""
    return TABLE.override(tile, **match)


def dropout_mask_tile(device):
    """The dropout-mask kernel's tile on `device`."""
    return DROPOUT_MASK_TABLE.lookup(arch=90 if launch_arch(device) == 90 else 80)
