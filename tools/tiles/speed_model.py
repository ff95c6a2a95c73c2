"""A static speed model of the attention kernels, read off their SASS: what one iteration of a kernel's main loop
issues, and how many clocks a 128 x 128 block of (query, key) pairs must take at best on one SM.

The model (a lower bound: every unit busy at once, perfect overlap), per SM per clock, for Hopper (H100 figures;
the H200 has the H100's SMs):
    tensor cores   2048 fp16/bf16 multiply-adds (wgmma; mma.sync, counted too, reaches about half)
    shared memory  128 bytes: every byte a matrix instruction reads from shared memory (a wgmma with both operands
                   in shared memory, "SS", reads A and B; one with A in registers, "RS", reads B), every LDS/LDSM and
                   STS, and every asynchronous global-to-shared copy (LDGSTS) that fills it
    MUFU           16 exp2
    issue          4 warp instructions (one per scheduler)
Global loads into registers (LDG) are not counted: the goals (tools.tiles.report.MODEL_GOALS) and the tutorial's
figures are stated in this model. L1 hits share the shared-memory data path, so a tile that loads per-iteration
vectors by LDG (with one stage, the dK/dV kernel's LSE and delta) models faster than it may run; tools.tiles.tune
times the model's best on a GPU, and timing decides.
A kernel's main loops are known by the matrix work one iteration does (`kernel_loops`): the forward's 2 products
of BLOCK_M x BLOCK_N x D; the backward's key programs' 4 of block_n1 x block_m1 x D (3 for dK and 2 for dV where
they have programs of their own) and its query programs' 3 of block_m2 x block_n2 x D. Of the innermost loops
doing that work, the one with the fewest instructions is modelled: the unmasked range (the masked edges run in
16-row diagonal pieces, whose products are smaller). Each loop's cost per iteration is scaled to a 128 x 128 block
of the (query, key) pairs an iteration covers; a kernel's clocks are its loops' sum, each loop's limiter being the
unit that takes longest.
"""

import re
from dataclasses import dataclass

RATES = {90: dict(tensor=2048, shared=128, mufu=16, issue=4)}
BLOCK_PAIRS = 128 * 128
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")
# fp16 operands are the default type and not spelled out: HGMMA.64x64x16.F32 is fp16, .F32.BF16 bf16.
_HGMMA_SHAPE = re.compile(r"HGMMA\.64x(\d+)x(\d+)\.F32")
_HMMA_SHAPE = re.compile(r"HMMA\.(16816|1688)\.F32")
_WIDTH = re.compile(r"\.(128|64|32|U16|S16|U8|S8)(?:\.|$)")
_WIDTH_BYTES = {"128": 16, "64": 8, "32": 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


@dataclass
class LoopCounts:
    """What one iteration of a loop issues, per warp (the SASS every warp runs)."""

    instructions: int = 0
    mufu: int = 0
    tensor_fma_per_warp: int = 0  # mma.sync: each warp's own
    tensor_fma_per_warpgroup: int = 0  # wgmma: each warpgroup's, issued by its four warps together
    shared_bytes_per_warp: int = 0  # LDS, LDSM, STS, LDGSTS
    shared_bytes_per_warpgroup: int = 0  # wgmma operands read from shared memory
    wgmma: tuple = ()  # the wgmma shapes issued


def parse(sass):
    """[(address, opcode, operands)] of cuobjdump -sass output."""
    return [(int(a, 16), op, args.strip()) for a, op, args in _INSTRUCTION.findall(sass)]


def innermost_loops(instructions):
    """[(first, last)] index ranges of the loops that contain no other loop: a backward branch closes a loop."""
    index_of = {address: i for i, (address, _, _) in enumerate(instructions)}
    loops = []
    for i, (address, opcode, args) in enumerate(instructions):
        target = _BRANCH_TARGET.search(args) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < address and int(target.group(1), 16) in index_of:
            loops.append((index_of[int(target.group(1), 16)], i))
    return [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]


def count(instructions):
    counts = LoopCounts()
    shapes = []
    for _, opcode, args in instructions:
        if opcode == "NOP":
            continue
        counts.instructions += 1
        if opcode.startswith("MUFU.EX2"):
            counts.mufu += 1
        elif opcode.startswith("HGMMA"):
            n, k = _HGMMA_SHAPE.match(opcode).groups()
            n, k = int(n), int(k)
            counts.tensor_fma_per_warpgroup += 64 * n * k
            a_in_registers = re.match(r"R\d+,\s*R\d+", args) is not None
            counts.shared_bytes_per_warpgroup += 2 * k * n + (0 if a_in_registers else 2 * k * 64)
            shapes.append(f"64x{n}x{k}{'RS' if a_in_registers else 'SS'}")
        elif opcode.startswith("HMMA"):
            shape = _HMMA_SHAPE.match(opcode)
            if shape:
                counts.tensor_fma_per_warp += 16 * 8 * (16 if shape.group(1) == "16816" else 8)
        elif opcode.startswith("LDSM"):
            counts.shared_bytes_per_warp += 128 * int(opcode.rsplit(".", 1)[1])  # .1, .2, .4 8x8 matrices
        elif opcode.startswith(("LDS", "STS", "LDGSTS")):
            width = _WIDTH.search(opcode[opcode.index("."):] if "." in opcode else "")
            counts.shared_bytes_per_warp += 32 * (_WIDTH_BYTES[width.group(1)] if width else 4)
    counts.wgmma = tuple(sorted(set(shapes)))
    return counts


def main_loop(sass, num_warps=None, multiply_adds=None):
    """The counts of the innermost loop with the fewest instructions among those with matrix work (with
    `multiply_adds` given: those doing exactly that many multiply-adds per iteration, all `num_warps` warps
    together), or None."""
    instructions = parse(sass)
    candidates = [count(instructions[first:last + 1]) for first, last in innermost_loops(instructions)]
    candidates = [c for c in candidates if c.tensor_fma_per_warp or c.tensor_fma_per_warpgroup]
    if multiply_adds is not None:
        candidates = [c for c in candidates if multiply_adds_per_iteration(c, num_warps) == multiply_adds]
    return min(candidates, key=lambda c: c.instructions) if candidates else None


def multiply_adds_per_iteration(counts, num_warps):
    """The tensor-core multiply-adds one iteration of a loop issues, all warps together."""
    return counts.tensor_fma_per_warp * num_warps + counts.tensor_fma_per_warpgroup * num_warps // 4


def kernel_loops(kernel, tile, head_dim):
    """[(multiply-adds per iteration, (query, key) pairs per iteration)] of the main loops of `kernel` ("forward"
    or "backward") at `tile` and the padded head size."""
    if kernel == "forward":
        return [(2 * tile.block_m * tile.block_n * head_dim, tile.block_m * tile.block_n)]
    key_pairs, query_pairs = tile.block_m1 * tile.block_n1, tile.block_m2 * tile.block_n2
    # P and dP over the whole head, dK and dV over a slice of its columns, once per slice
    slice_dim = head_dim // tile.head_slices
    key_loops = [((2 * head_dim + slice_dim) * key_pairs, key_pairs), ((head_dim + slice_dim) * key_pairs, key_pairs)] \
        if tile.dk_dv_apart else [((2 * head_dim + 2 * slice_dim) * key_pairs, key_pairs)]
    return key_loops * tile.head_slices + [(3 * query_pairs * head_dim, query_pairs)]


def kernel_clocks(sass, arch, kernel, tile, head_dim):
    """(clocks per 128 x 128 block, limiters, the loops' counts) of a kernel's main loops (kernel_loops), or None
    where one is not found: the clocks summed over its loops, each at its own limiter."""
    total, limiters, loops = 0.0, [], []
    for multiply_adds, pairs in kernel_loops(kernel, tile, head_dim):
        loop = main_loop(sass, tile.num_warps, multiply_adds)
        if loop is None:
            return None
        clocks, limiter = block_clocks(loop, arch, tile.num_warps, pairs)
        total += clocks[limiter]
        limiters.append(limiter)
        loops.append(loop)
    return total, limiters, loops


def block_clocks(counts, arch, num_warps, pairs):
    """{unit: clocks} for one 128 x 128 block of a loop whose iteration covers `pairs` (query, key) pairs, and the
    limiter, by the model above."""
    rates = RATES[arch]
    warpgroups = num_warps / 4
    per_iteration = {
        "tensor": (counts.tensor_fma_per_warp * num_warps + counts.tensor_fma_per_warpgroup * warpgroups)
        / rates["tensor"],
        "shared memory": (counts.shared_bytes_per_warp * num_warps + counts.shared_bytes_per_warpgroup * warpgroups)
        / rates["shared"],
        "MUFU": counts.mufu * 32 * num_warps / rates["mufu"],
        "issue": counts.instructions * num_warps / rates["issue"],
    }
    scale = BLOCK_PAIRS / pairs
    clocks = {unit: value * scale for unit, value in per_iteration.items()}
    return clocks, max(clocks, key=clocks.get)


def rows_per_matrix_product(kernel, tile):
    """The fewest rows of the tile's main matrix products (their M): the queries a forward program holds; the keys
    a backward key program holds or the queries a query program holds."""
    return tile.block_m if kernel == "forward" else min(tile.block_n1, tile.block_m2)


def duplicates_work(kernel, tile):
    """Whether warpgroups repeat each other's work: a wgmma is 64 rows per warpgroup, so a tile with fewer rows than
    64 per warpgroup has its warpgroups compute the same products (the diagonal pieces' 16-row products aside,
    which are mma.sync)."""
    return rows_per_matrix_product(kernel, tile) < 64 * tile.num_warps // 4
