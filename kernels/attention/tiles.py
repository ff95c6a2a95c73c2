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


# --------------------------------------------------------------------------------------------------------------
# Decoding (decode.py): the split kernel's tiles and the number of splits.
#
# The split kernel holds block_m query rows of one key/value group (its query heads times the new tokens; a larger
# group takes several row blocks, each reading the group's keys, the later ones from L2) and streams block_n cached
# keys per step. Decoding computes little per byte of cache: the tiles are chosen for loads in flight (stages,
# programs per multiprocessor), not for products, so block_m is the smallest tl.dot (16; wgmma would need 64 rows
# per warpgroup, mostly padding). Each tile compiles without spills for sm_90 and sm_80, aligned operands and not,
# fp16, bf16 and fp32, one split and several (ptxas -v on a scratch compile the way bench/compile_report compiles;
# the decode kernels are not in its report). Register counts jump between tiles: head size 256 needs 8 warps, and
# misaligned operands take up to 255 registers per thread.
_DECODE_TABLE = {
    "16bit": {16: Tile(16, 64, 4, 3), 32: Tile(16, 64, 4, 3), 64: Tile(16, 64, 4, 3), 128: Tile(16, 32, 4, 3),
              256: Tile(16, 16, 8, 3)},
    "fp32": {16: Tile(16, 32, 4, 2), 32: Tile(16, 32, 4, 2), 64: Tile(16, 64, 4, 2), 128: Tile(16, 32, 8, 2),
             256: Tile(16, 16, 8, 2)},
}
DECODE_INTERPRETER_TILE = Tile(16, 16, 1, 1)
# New keys and values are copied into the cache this many rows per step.
APPEND_BLOCK_R = 16
# Splits: enough programs for DECODE_PROGRAMS_PER_MULTIPROCESSOR per multiprocessor, each with at least
# DECODE_MIN_KEYS_PER_SPLIT of the cache's slots (fewer would spend more on writing and combining partial results
# than on reading keys), and at most MAX_DECODE_SPLITS (FlashAttention's bound: past it the combine kernel, which
# walks the splits one by one, costs more than the parallelism gains).
DECODE_PROGRAMS_PER_MULTIPROCESSOR = 2
DECODE_MIN_KEYS_PER_SPLIT = 256
MAX_DECODE_SPLITS = 128
# The combine kernel takes the split kernel's blocks of query rows.
COMBINE_NUM_WARPS = 4
# What the split count is computed for under Triton's interpreter, which has no multiprocessors.
INTERPRETER_MULTIPROCESSORS = 4


def decode_table_tile(head_dim, dtype):
    """The split kernel's tile on a GPU (one table for every checked architecture)."""
    return _DECODE_TABLE[_precision(dtype)][block_d(head_dim)]


def decode_tile(head_dim, dtype, device):
    """The split kernel's tile for `device`: the table's on a GPU, small blocks under the interpreter."""
    return decode_table_tile(head_dim, dtype) if device.type == "cuda" else DECODE_INTERPRETER_TILE


def decode_splits(programs, n_max, multiprocessors):
    """How many chunks each sequence's keys are cut into, from what the host knows without reading the lengths:
    `programs` (batch x key/value heads x row blocks) per split, the cache's slots per sequence n_max and the GPU's
    multiprocessors. A short sequence in a long cache is still spread over every split (the kernel sizes the chunks
    from each sequence's own length)."""
    wanted = triton.cdiv(DECODE_PROGRAMS_PER_MULTIPROCESSOR * multiprocessors, programs)
    return max(1, min(wanted, triton.cdiv(n_max, DECODE_MIN_KEYS_PER_SPLIT), MAX_DECODE_SPLITS))


def launch_splits(programs, n_max, device):
    """decode_splits for `device`'s multiprocessors."""
    if device.type == "cuda":
        multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        multiprocessors = INTERPRETER_MULTIPROCESSORS
    return decode_splits(programs, n_max, multiprocessors)
