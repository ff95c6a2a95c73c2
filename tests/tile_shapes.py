"""The tile shapes the launch tables ship, and forcing them on the interpreter's launches (the gpu_tiles fixture).

Under Triton's interpreter the launchers run the tables' sm_90 tiles. That alone would leave the other shipped
shapes (sm_80's, misaligned operands', dropout's, fp32's) unrun off a GPU, and much of the band arithmetic depends
on the shape: BLOCK_M against BLOCK_N, 16-row tiles, 128-row blocks cut into diagonal pieces. So each attention test
runs its launches at shapes picked from every shape the tables ship, a different pick per test (by its id, so a
rerun picks the same). The interpreter's cost is per program and per operation far more than per element, so no
shape costs much more than another. The shapes come from the tables themselves: a tile a later change adds joins
the rotation, and tests/test_attention_tiles.py runs each one at least once per kernel.
"""

import contextlib
import zlib

from kernels.attention import tiles as attention_tiles
from kernels.attention.tiles import Tile
from kernels.decode import tiles as decode_tiles

# Dropout-mask tiles beside the shipped one, so that a test can always give the mask helper a tile unlike every
# kernel's of the call (a multiple of 4 keys wide: Philox draws four keys at a time).
_OTHER_MASK_TILES = (Tile(16, 128, 4, 1), Tile(128, 16, 4, 1), Tile(32, 64, 4, 1), Tile(64, 32, 4, 1))
# Shapes no table ships, run in the rotation beside the shipped ones: every shipped forward tile holds at least as
# many queries as it streams keys, so without this one no forward would hold fewer (the band's block ranges round
# to BLOCK_N, not BLOCK_M; the backward's shipped tiles have both kinds).
UNSHIPPED_SHAPES = {"forward": [Tile(16, 64, 4, 1)]}


def _distinct(tiles, blocks):
    """The tiles with distinct block fields (warps and stages mean nothing to the interpreter), in table order."""
    found = {}
    for tile in tiles:
        found.setdefault(tuple(getattr(tile, field) for field in blocks), tile)
    return list(found.values())


def shipped_shapes():
    """{launch: [tile, ...]}: every distinct block shape each launch's table ships. "forward" and "decode": Tile
    (block_m, block_n); "backward": BackwardTile (its key programs' block_m1 x block_n1, its query programs' block_m2
    x block_n2, dK and dV apart or not, in column slices or not); "dropout_mask": Tile."""
    def of(table, kernel=None):
        return [rule.tile for rule in table.rules if kernel is None or rule.match.get("kernel") == kernel]

    return {
        "forward": _distinct(of(attention_tiles.TABLE, "forward"), ("block_m", "block_n")),
        "backward": _distinct(of(attention_tiles.TABLE, "backward"),
                              ("block_m1", "block_n1", "block_m2", "block_n2", "dk_dv_apart", "head_slices")),
        "decode": _distinct(of(decode_tiles.TABLE), ("block_m", "block_n")),
        "dropout_mask": _distinct(of(attention_tiles.DROPOUT_MASK_TABLE), ("block_m", "block_n")),
    }


def block_shapes(launch, tile):
    """The (rows, columns) blocks a launch at `tile` computes in: the dropout mask's and the kernels' tiles."""
    if launch == "backward":
        return {(tile.block_m1, tile.block_n1), (tile.block_m2, tile.block_n2)}
    return {(tile.block_m, tile.block_n)}


def rotation():
    """{launch: [tile, ...]}: the shapes the tests run in turn, every shipped one and UNSHIPPED_SHAPES."""
    return {launch: tiles + UNSHIPPED_SHAPES.get(launch, []) for launch, tiles in shipped_shapes().items()}


def _pick(shapes, test_id, salt):
    return shapes[zlib.crc32(f"{salt}:{test_id}".encode()) % len(shapes)]


def picked_shapes(test_id):
    """The shapes a test runs at: one per launch, picked from the rotation by the test's id; the dropout mask's
    unlike every kernel block of the call, so the mask helper and the kernels never share a tile."""
    shapes = rotation()
    picked = {launch: _pick(shapes[launch], test_id, launch) for launch in ("forward", "backward", "decode")}
    kernel_blocks = set().union(*(block_shapes(launch, tile) for launch, tile in picked.items()))
    masks = [tile for tile in (*shapes["dropout_mask"], *_OTHER_MASK_TILES)
             if (tile.block_m, tile.block_n) not in kernel_blocks]
    picked["dropout_mask"] = _pick(masks, test_id, "dropout_mask")
    return picked


@contextlib.contextmanager
def forced(shapes):
    """Within the block every launch named in `shapes` ({launch: tile}) runs at its tile, through the tables'
    overrides."""
    tables = {"forward": (attention_tiles.TABLE, {"kernel": "forward"}),
              "backward": (attention_tiles.TABLE, {"kernel": "backward"}),
              "decode": (decode_tiles.TABLE, {}), "dropout_mask": (attention_tiles.DROPOUT_MASK_TABLE, {})}
    with contextlib.ExitStack() as stack:
        for launch, tile in shapes.items():
            table, match = tables[launch]
            stack.enter_context(table.override(tile, **match))
        yield
