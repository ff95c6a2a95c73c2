"""Launch tiles of the attention kernels: block sizes, warps and stages per input precision, head size, kernel,
dropout, GPU architecture and operand alignment.

The dK/dV kernel holds BLOCK_N keys and streams BLOCK_M queries; the others hold BLOCK_M queries and stream
BLOCK_N keys. At head size 256 dK and dV are computed by two launches, "dk" and "dv" (see key_block_passes).
Every tile the tables can give is compiled for each architecture in kernels._gpu.CHECKED_ARCHS, aligned and not,
by bench/compile_report.py, which fails on spills, excess shared memory or, on sm_90, matrix products that miss
wgmma.
"""

from collections import namedtuple

import torch
import triton

from .._gpu import device_arch

Tile = namedtuple("Tile", "block_m block_n num_warps num_stages")

MAX_HEAD_SIZE = 256

# Tiles keyed by the input precision and BLOCK_D (the head size padded to a power of two).
# Hopper first: 16-bit tiles whose matrix-product rows (BLOCK_M; BLOCK_N for dK/dV) are 64 or more with
# num_warps = 8, so tl.dot becomes wgmma on sm_90; the same tiles run mma.sync on Ampere. Each is the largest
# tile tried that compiles without register spills for sm_90 and sm_80, with aligned operands and without
# (ptxas -v; the committed bench/results/compile_report.md). fp32 is multiplied in true fp32 without tensor
# cores, whose operands are register-hungry: small tiles.
_TABLE = {
    "16bit": {
        16: {"forward": Tile(128, 64, 8, 3), "dkdv": Tile(32, 128, 8, 3), "dq": Tile(128, 64, 8, 3)},
        32: {"forward": Tile(128, 64, 8, 3), "dkdv": Tile(32, 128, 8, 3), "dq": Tile(128, 64, 8, 3)},
        64: {"forward": Tile(128, 64, 8, 3), "dkdv": Tile(16, 128, 8, 2), "dq": Tile(128, 64, 8, 3)},
        128: {"forward": Tile(128, 32, 8, 3), "dkdv": Tile(32, 64, 8, 2), "dq": Tile(64, 32, 8, 2)},
        256: {"forward": Tile(32, 32, 4, 2), "dk": Tile(16, 32, 8, 1), "dv": Tile(16, 64, 8, 2),
              "dq": Tile(32, 16, 8, 2)},
    },
    "fp32": {
        16: {"forward": Tile(32, 32, 4, 1), "dkdv": Tile(16, 32, 8, 1), "dq": Tile(32, 32, 8, 1)},
        32: {"forward": Tile(32, 32, 4, 1), "dkdv": Tile(16, 32, 8, 1), "dq": Tile(32, 32, 4, 1)},
        64: {"forward": Tile(32, 16, 4, 1), "dkdv": Tile(32, 16, 8, 1), "dq": Tile(32, 32, 8, 1)},
        128: {"forward": Tile(32, 16, 8, 1), "dkdv": Tile(16, 16, 8, 1), "dq": Tile(16, 16, 8, 1)},
        256: {"forward": Tile(16, 16, 4, 1), "dk": Tile(16, 16, 8, 1), "dv": Tile(16, 16, 4, 1),
              "dq": Tile(16, 32, 8, 1)},
    },
}
# Tiles that replace the table's for some launches, as ((precision, BLOCK_D, kernel, dropout, arch, aligned), tile);
# None in a key matches anything, and the first matching entry wins. `aligned`: every operand pointer 16-byte
# aligned, its last stride 1 and the others multiples of 16 bytes (kernels.operands_aligned): loads are then
# vectorised and pipelined into shared memory asynchronously. Misaligned operands are loaded element by element
# through registers, which costs registers.
_OVERRIDES = [
    # Head size 256 on sm_90 with aligned operands: wgmma tiles of two warpgroups, each holding a 64 x 256 fp32
    # accumulator (128 registers per thread) against 16 or 32 streamed rows. Misaligned, every wgmma tile tried
    # spills (the streamed tiles pass through registers), so those launches keep the table's mma.sync tiles.
    (("16bit", 256, "forward", None, 90, True), Tile(128, 32, 8, 2)),
    (("16bit", 256, "dq", None, 90, True), Tile(128, 16, 8, 2)),
    (("16bit", 256, "dk", None, 90, True), Tile(32, 128, 8, 2)),
    (("16bit", 256, "dv", None, 90, True), Tile(32, 128, 8, 2)),
    # Dropout's random numbers take registers; where the table's tile then spills, dropout runs a smaller one.
    # dK/dV at head size 128 on sm_90: 64 keys x 16 queries with 8 warps is wgmma without spills but spills 36 B
    # on sm_80, and every larger key tile spills on both.
    (("16bit", 128, "dkdv", True, 90, None), Tile(16, 64, 8, 2)),
    (("16bit", 128, "dkdv", True, None, None), Tile(32, 32, 4, 2)),
    (("16bit", 128, "dq", True, None, None), Tile(128, 16, 8, 2)),
    (("16bit", 256, "dk", True, None, None), Tile(16, 16, 8, 1)),
    (("fp32", 256, "dv", True, None, None), Tile(16, 16, 8, 1)),
]
# The CPU interpreter gets small blocks: its cost grows with the number of elements computed, masked or not.
INTERPRETER_TILE = Tile(32, 32, 1, 1)
# Which gradients each key-block launch computes: (COMPUTE_DK, COMPUTE_DV).
COMPUTED_GRADIENTS = {"dkdv": (True, True), "dk": (True, False), "dv": (False, True)}


def block_d(head_dim):
    """The head size padded to a power of two, at least 16 (the smallest tl.dot)."""
    return max(16, triton.next_power_of_2(head_dim))


def key_block_passes(padded_head_dim):
    """The launches of the dK/dV kernel: one computing both, or at head size 256 one for dK and one for dV, each
    recomputing P. Two (BLOCK_N x 256) fp32 accumulators do not fit in registers together: at the 64 key rows per
    warpgroup that wgmma needs they alone are 256 registers per thread, and smaller tiles starve the tensor cores.
    The split costs one more Q K^T product per key block (5 products instead of 4)."""
    return ("dk", "dv") if padded_head_dim > 128 else ("dkdv",)


def preprocess_block_m(padded_head_dim):
    """Rows per program of the delta kernel: 8192 elements of O and of dO per 4 warps stay in registers."""
    return min(64, 8192 // padded_head_dim)


def _precision(dtype):
    return "fp32" if dtype == torch.float32 else "16bit"


def table_tile(kernel, head_dim, dtype, dropout, arch, aligned):
    """The tile `kernel` runs on `arch` (90 for sm_90; other archs get the general tiles, chosen for sm_80)."""
    precision = _precision(dtype)
    launch = (precision, block_d(head_dim), kernel, dropout, arch, aligned)
    for key, tile in _OVERRIDES:
        if all(want is None or want == have for want, have in zip(key, launch)):
            return tile
    return _TABLE[precision][block_d(head_dim)][kernel]


def launch_tile(kernel, head_dim, dtype, dropout, device, aligned):
    """The tile for `kernel` ("forward", "dkdv", "dk", "dv" or "dq") on `device`, for operands that are
    `aligned` (kernels.operands_aligned) or not. GPUs older than Ampere have less shared memory: no software
    pipelining there."""
    if device.type != "cuda":
        return INTERPRETER_TILE
    tile = table_tile(kernel, head_dim, dtype, dropout, device_arch(device), aligned)
    return tile._replace(num_stages=1) if device_arch(device) < 80 else tile
