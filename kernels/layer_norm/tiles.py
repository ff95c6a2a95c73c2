"""Tile shapes of the LayerNorm kernels, from the row width: rows per program, columns per tile, whether a row is
streamed in chunks (the streamed kernels), and warps."""

import functools
from collections import namedtuple

from .._gpu import multiprocessors
from .._library import next_power_of_2

Tile = namedtuple("Tile", "rows block_n streamed num_warps")

# Tile shapes, per direction: the widest row that stays in registers as one tile (a wider row is streamed in
# chunk-wide tiles), the elements a tile of narrow rows aims for, and the elements each thread holds (which sets
# the warps). The backward keeps more values live per element, so its tiles are smaller. Sized so that every
# tile compiles for sm_80 and sm_90 without register spills, with aligned operands and without (the compile
# report; streamed fp16 rows in 4096-wide tiles of 8 warps spill on sm_90 when misaligned).
_FORWARD = dict(max_block=8192, chunk=8192, tile_elements=4096, elements_per_thread=16)
_BACKWARD = dict(max_block=1024, chunk=2048, tile_elements=2048, elements_per_thread=8)
MAX_ROWS_PER_PROGRAM = 16
# Programs of the backward: a few per SM on a GPU, so dweight and dbias have few partial rows to sum.
BACKWARD_PROGRAMS_PER_SM = 4
BACKWARD_PROGRAMS_ON_CPU = 4
# Offsets in the kernels are 32-bit (64-bit row offsets cost registers and spills), so a tensor holds fewer
# elements than this.
MAX_ELEMENTS = 2**31
# A width of each class the tiles tell apart: several rows per tile (384, the decoder's), the backward's widest
# tile (1024), one row per forward tile and streamed backward rows (4096, and 8192: the forward's widest tile),
# streamed in both directions (65536). The compile report compiles these.
SHIPPED_WIDTHS = (384, 1024, 4096, 8192, 65536)


def _tile(n_cols, max_block, chunk, tile_elements, elements_per_thread):
    """A row of at most max_block elements is one tile row; narrow rows are stacked up to tile_elements per
    tile. A wider row is streamed in chunk-wide tiles, one row at a time. The warps give each thread about
    elements_per_thread elements, between 1 and 16 warps."""
    if n_cols <= max_block:
        block_n = next_power_of_2(n_cols)
        rows = min(MAX_ROWS_PER_PROGRAM, max(1, tile_elements // block_n))
        streamed = False
    else:
        block_n, rows, streamed = chunk, 1, True
    return Tile(rows, block_n, streamed, min(16, max(1, rows * block_n // (32 * elements_per_thread))))


@functools.lru_cache(maxsize=None)
def forward_tile(n_cols):
    return _tile(n_cols, **_FORWARD)


@functools.lru_cache(maxsize=None)
def backward_tile(n_cols):
    return _tile(n_cols, **_BACKWARD)


def backward_programs(device):
    if device.type == "cuda":
        return multiprocessors(device) * BACKWARD_PROGRAMS_PER_SM
    return BACKWARD_PROGRAMS_ON_CPU
