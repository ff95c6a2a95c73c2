"""Launch tiles of the LayerNorm kernels, one TileTable keyed by direction, precision, width and operand alignment,
and the persistent grids.

    direction   "forward", "backward" (both passes of a streamed backward share its tile), or "partials_sum"
                (the backward's final sum of the dweight / dbias partial rows)
    precision   "16bit" (fp16, bf16), "fp32", or "mixed": 16-bit rows whose sum is kept in fp32
                (residual_in_fp32), the forward's fp32 residual and sum beside the 16-bit x and y, the backward's
                fp32 sum and its gradients beside the 16-bit dy and weight, which take more registers than either
                precision's rows (`launch_precision`)
    width       the row width padded to a power of two, up to the widest row the direction holds on chip
                (MAX_ON_CHIP_WIDTH), or "streamed" beyond it (partials_sum: always)
    aligned     whether the launch compiles the kernels' aligned variant (operands_aligned)

A tile is (rows, block_n, num_warps, programs_per_sm): rows per register tile (for partials_sum: partial rows
loaded per step), columns per tile (a streamed row's chunk, or column tile), warps, and the programs of the
persistent grid per multiprocessor. Every tile compiles for sm_90 and sm_80 without register spills (fp32: within
the compile report's fp32 allowance) for the alignments that reach it (the compile report, which also shows the
next width up spilling past each on-chip limit).
"""

import functools
from collections import namedtuple

import torch

from .._gpu import multiprocessors as device_multiprocessors
from .._library import cdiv, next_power_of_2
from .._tiles import TileRule, TileTable
from ..attention.tiles import precision

Tile = namedtuple("Tile", "rows block_n num_warps programs_per_sm")

# The widest row each direction holds in registers, per precision and operand alignment. The backward holds more
# per column (the weight and the dweight / dbias partial sums across all its rows, besides the row of x and dy)
# than the forward (the weight and bias, besides the row). Misaligned operands are loaded element by element,
# which costs registers: 16-bit ones and those with an fp32 sum stop one width earlier (the next one up spilled);
# fp32 ones, loaded a 4-byte element at a time either way, reach the aligned limits, spilling at most 64 B there
# as the aligned fp32 rows do (within the compile report's fp32 allowance).
MAX_ON_CHIP_WIDTH = {
    ("forward", "16bit", True): 16384, ("forward", "16bit", False): 8192,
    ("forward", "fp32", True): 16384, ("forward", "fp32", False): 16384,
    ("forward", "mixed", True): 8192, ("forward", "mixed", False): 8192,
    ("backward", "16bit", True): 8192, ("backward", "16bit", False): 4096,
    ("backward", "fp32", True): 8192, ("backward", "fp32", False): 8192,
    ("backward", "mixed", True): 2048, ("backward", "mixed", False): 512,  # 4096 (1024 misaligned) spilled
}
# What the grids are sized for under Triton's interpreter, which has no multiprocessors.
INTERPRETER_MULTIPROCESSORS = 2
# A backward program stores a dweight and a dbias row in fp32, which the final sum reads again: the bytes of several
# rows of 16-bit input. So each program takes at least this many rows (the partials cost at most 10% more).
MIN_BACKWARD_ROWS_PER_PROGRAM = 32
# Offsets in the kernels are 32-bit (64-bit row offsets cost registers and spills), so a tensor holds fewer
# elements than this.
MAX_ELEMENTS = 2**31


def _rules(direction, tiles, why):
    """One rule per (width, tile) of `tiles`, {width: Tile}, for every precision and alignment."""
    return [TileRule({"direction": direction, "width": width}, tile, why) for width, tile in tiles.items()]


_ON_CHIP_FORWARD = "each row read once; weight and bias held across the program's rows"
_ON_CHIP_BACKWARD = "each row read once; weight and dweight / dbias partials held across the program's rows"
# Narrow rows are stacked into tiles of about 4096 elements (forward) or 2048 (backward, which keeps more values
# live per element), at most 16 rows, with about 16 (8) elements per thread; from 4096 (2048) columns up a tile is
# one row. Programs per multiprocessor: as many as fit in its 65536 registers at the registers the compile report
# shows with aligned operands (misaligned ones, which take more, may then run in two waves), within 48 warps
# (sm_86 and sm_89 hold fewer than sm_80 and sm_90), at most 8.
TABLE = TileTable("layer_norm", ("direction", "precision", "width", "aligned"), [
    TileRule({"direction": "forward", "precision": "mixed", "width": 4096}, Tile(1, 4096, 16, 1),
             _ON_CHIP_FORWARD + " (8 warps spill here with an fp32 residual and sum)"),
    *_rules("forward", {
        1: Tile(16, 1, 1, 8), 2: Tile(16, 2, 1, 8), 4: Tile(16, 4, 1, 8), 8: Tile(16, 8, 1, 8),
        16: Tile(16, 16, 1, 8), 32: Tile(16, 32, 2, 8), 64: Tile(16, 64, 2, 8), 128: Tile(16, 128, 4, 7),
        256: Tile(16, 256, 8, 3), 512: Tile(8, 512, 8, 3), 1024: Tile(4, 1024, 8, 3), 2048: Tile(2, 2048, 8, 3),
        4096: Tile(1, 4096, 8, 3), 8192: Tile(1, 8192, 16, 1),
    }, _ON_CHIP_FORWARD),
    TileRule({"direction": "forward", "width": 16384}, Tile(1, 16384, 32, 1),
             _ON_CHIP_FORWARD + " (misaligned 16-bit rows spill here: they stop at 8192)"),
    TileRule({"direction": "forward", "width": "streamed", "aligned": True}, Tile(1, 8192, 16, 1),
             "wider than the registers hold: chunks of 8192, the last one held"),
    TileRule({"direction": "forward", "width": "streamed", "aligned": False}, Tile(1, 4096, 16, 1),
             "wider than the registers hold: chunks of 4096, the last one held"),
    TileRule({"direction": "backward", "width": 1024, "aligned": False}, Tile(1, 1024, 8, 3),
             _ON_CHIP_BACKWARD + " (two rows a tile spilled on sm_90 with dropout's mask)"),
    *_rules("backward", {
        1: Tile(16, 1, 1, 8), 2: Tile(16, 2, 1, 8), 4: Tile(16, 4, 1, 8), 8: Tile(16, 8, 1, 8),
        16: Tile(16, 16, 1, 8), 32: Tile(16, 32, 2, 8), 64: Tile(16, 64, 4, 6), 128: Tile(16, 128, 8, 3),
        256: Tile(8, 256, 8, 3), 512: Tile(4, 512, 8, 3), 1024: Tile(2, 1024, 8, 3), 2048: Tile(1, 2048, 8, 3),
        4096: Tile(1, 4096, 16, 1),
    }, _ON_CHIP_BACKWARD),
    TileRule({"direction": "backward", "precision": "16bit", "width": 8192, "aligned": True}, Tile(1, 8192, 32, 1),
             _ON_CHIP_BACKWARD + " (misaligned rows spill here with dropout's mask: they stop at 4096)"),
    TileRule({"direction": "backward", "precision": "fp32", "width": 8192}, Tile(1, 8192, 16, 1),
             _ON_CHIP_BACKWARD + " (32 warps spill here, with 64 registers a thread)"),
    TileRule({"direction": "backward", "width": "streamed"}, Tile(4, 2048, 16, 1),
             "two passes over column tiles of 2048, 4 rows at a time; partials held across the program's rows"),
    TileRule({"direction": "partials_sum"}, Tile(8, 256, 2, 0),
             "8 partial rows in flight per step, 256 columns per program (one launch: no persistent grid)"),
])


def launch_precision(dtype, sum_dtype):
    """The table's precision of a launch whose rows have `dtype` (the forward's x, the backward's dy) and whose sum
    (the forward's s, the backward's normalized rows) has sum_dtype: "mixed" for 16-bit rows with an fp32 sum, else
    the dtype's."""
    if sum_dtype != dtype and sum_dtype == torch.float32:
        return "mixed"
    return precision(dtype)


@functools.lru_cache(maxsize=None)
def launch_width(direction, precision, n_cols, aligned):
    """The table's width key of a row of n_cols elements: its padded width, or "streamed" where that exceeds
    what the direction holds on chip at the precision and the alignment (partials_sum holds no row: always
    streamed)."""
    padded = next_power_of_2(n_cols)
    return padded if padded <= MAX_ON_CHIP_WIDTH.get((direction, precision, aligned), 0) else "streamed"


def launch_tile(direction, precision, n_cols, aligned):
    """The tile of a launch (memoised by the table)."""
    return TABLE.lookup(direction=direction, precision=precision,
                        width=launch_width(direction, precision, n_cols, aligned), aligned=aligned)


def operands_aligned(n_cols, *tensors):
    """Whether the launch compiles the kernels' aligned variant: Triton's JIT marks a pointer aligned when it is a
    multiple of 16 bytes and an integer when it is a multiple of 16, so every tensor's pointer and row stride (and
    the width) must be. A tensor's row stride is its stride(-2) (the launchers pass contiguous tensors as they are,
    others as (rows, width) views). None stands for an absent tensor; the kernels' outputs are fresh and
    contiguous."""
    if n_cols % 16:
        return False
    for t in tensors:  # a loop, not a generator: asked on every launch
        if t is not None and (t.data_ptr() % 16 or (t.dim() > 1 and t.stride(-2) % 16)):
            return False
    return True


def launch_keys():
    """Every (direction, precision, width, aligned) key the launchers can look up."""
    keys = [(direction, precision, width, aligned)
            for (direction, precision, aligned), limit in MAX_ON_CHIP_WIDTH.items()
            for width in [2**i for i in range(limit.bit_length())] + ["streamed"]]
    return keys + [("partials_sum", precision, "streamed", aligned) for precision in ("16bit", "fp32")
                   for aligned in (True, False)]


def multiprocessors(device):
    """The device's multiprocessors (INTERPRETER_MULTIPROCESSORS on CPU), which the persistent grids are sized by."""
    return device_multiprocessors(device) if device.type == "cuda" else INTERPRETER_MULTIPROCESSORS


def forward_programs(n_rows, tile, device):
    """The forward's grid: about programs_per_sm programs per multiprocessor, each a contiguous run of tiles of
    tile.rows rows (1 for streamed rows)."""
    return _persistent_grid(cdiv(n_rows, tile.rows), tile.programs_per_sm * multiprocessors(device))


def backward_row_groups(n_rows, tile, column_tiles, device):
    """The backward's row groups (its grid is column tiles x row groups): about programs_per_sm programs per
    multiprocessor in all, each of at least MIN_BACKWARD_ROWS_PER_PROGRAM rows."""
    wanted = min(tile.programs_per_sm * multiprocessors(device) // column_tiles,
                 n_rows // MIN_BACKWARD_ROWS_PER_PROGRAM)
    return _persistent_grid(cdiv(n_rows, tile.rows), max(1, wanted))


def _persistent_grid(n_items, programs):
    """The number of programs that gives at most `programs` programs non-empty contiguous runs of n_items items
    (row tiles; the kernels' program_run): each owns cdiv(n_items, programs) items, the last possibly fewer."""
    return cdiv(n_items, cdiv(n_items, programs)) if n_items else 0
