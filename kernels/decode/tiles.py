"""Launch tiles of the decoding kernels: the split kernel's tile per input precision and head size, the append and
combine kernels' blocks, and the number of splits.

The split kernel holds block_m query rows of one key/value group (its query heads times the new tokens; a larger
group takes several row blocks, each reading the group's keys, the later ones from L2) and streams block_n cached
keys per step. Decoding computes little per byte of cache: the tiles are chosen for loads in flight (stages,
programs per multiprocessor), not for products, so block_m is the smallest tl.dot (16; wgmma would need 64 rows per
warpgroup, mostly padding). Each tile compiles without spills for sm_90 and sm_80, aligned operands and not, fp16,
bf16 and fp32, one split and several (ptxas -v on a scratch compile the way tools.tiles.compile compiles; the
decode kernels are not in its report). Register counts jump between tiles: head size 256 needs 8 warps, and
misaligned operands take up to 255 registers per thread.
"""

from .._gpu import multiprocessors
from .._library import cdiv
from .._tiles import TileRule, TileTable
from ..attention.tiles import Tile, block_d, precision

# No GPU has timed these tiles: each is one that compiled spill-free (see above), chosen_by "fit".
_CLEAN = "spill-free in every variant"
TABLE = TileTable("decoding", ("precision", "head"), [
    TileRule({"precision": "16bit", "head": 16}, Tile(16, 64, 4, 3), _CLEAN),
    TileRule({"precision": "16bit", "head": 32}, Tile(16, 64, 4, 3), _CLEAN),
    TileRule({"precision": "16bit", "head": 64}, Tile(16, 64, 4, 3), _CLEAN),
    TileRule({"precision": "16bit", "head": 128}, Tile(16, 32, 4, 3), _CLEAN),
    TileRule({"precision": "16bit", "head": 256}, Tile(16, 16, 8, 3), _CLEAN + "; head size 256 needs 8 warps"),
    TileRule({"precision": "fp32", "head": 16}, Tile(16, 32, 4, 2), _CLEAN),
    TileRule({"precision": "fp32", "head": 32}, Tile(16, 32, 4, 2), _CLEAN),
    TileRule({"precision": "fp32", "head": 64}, Tile(16, 64, 4, 2), _CLEAN),
    TileRule({"precision": "fp32", "head": 128}, Tile(16, 32, 8, 2), _CLEAN),
    TileRule({"precision": "fp32", "head": 256}, Tile(16, 16, 8, 2), _CLEAN + "; head size 256 needs 8 warps"),
])
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


def decode_tile(head_dim, dtype):
    """The split kernel's tile (one table for every checked architecture; the interpreter runs it too). A launch
    the table has no tile for is a LookupError naming its key."""
    return TABLE.lookup(precision=precision(dtype), head=block_d(head_dim))


def decode_splits(programs, n_max, multiprocessors):
    """How many chunks each sequence's keys are cut into, from what the host knows without reading the lengths:
    `programs` (batch x key/value heads x row blocks) per split, the cache's slots per sequence n_max and the GPU's
    multiprocessors. A short sequence in a long cache is still spread over every split (the kernel sizes the chunks
    from each sequence's own length)."""
    wanted = cdiv(DECODE_PROGRAMS_PER_MULTIPROCESSOR * multiprocessors, programs)
    return max(1, min(wanted, cdiv(n_max, DECODE_MIN_KEYS_PER_SPLIT), MAX_DECODE_SPLITS))


def launch_splits(programs, n_max, device):
    """decode_splits for `device`'s multiprocessors."""
    count = multiprocessors(device) if device.type == "cuda" else INTERPRETER_MULTIPROCESSORS
    return decode_splits(programs, n_max, count)
