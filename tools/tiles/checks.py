"""What makes a compiled config unfit to ship (`problems`): the verdict the compile report prints, the search looks
for a tile to escape, and tests/test_compile_report.py asserts on every shipped config.

A config fails when it does not compile, spills (fp32: more than FP32_SPILL_ALLOWANCE_BYTES), uses more shared
memory than an arch that runs it allows, runs mma.sync on sm_90 with aligned operands, or duplicates work across
sm_90 warpgroups. Registers and spills depend on the compiler: the tiles were checked with triton
TILES_CHECKED_WITH.
"""

# The Triton release whose compiler the shipped tiles were checked with: registers and spills are that compiler's
# (3.9 spills where 3.6 does not). The report test runs only under it; on another version, retune first.
TILES_CHECKED_WITH = "3.6.0"
# The most shared memory one program may ask for (bytes): 227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on sm_86 and
# sm_89, which run sm_80's code: its compiles are held to the smallest limit of the archs that run them.
MAX_SHARED_BYTES = {90: 232448, 80: 166912, 86: 101376, 89: 101376}
# fp32 products run on the FMA units, and Triton's FMA dot holds whole rows of both operands per thread: at
# head size 128 and 256, under the windowed packed mask with dropout, every fp32 tile spills a few words
# (tools.tiles.search finds none clean down to 16 x 16 with 1 to 8 warps). fp32 is the accuracy path, several
# times slower than 16-bit whatever its tile, so a few spilled words per thread are accepted there; more means a
# tile or kernel regressed.
FP32_SPILL_ALLOWANCE_BYTES = 128


def problems(result):
    """What makes a compiled config (tools.tiles.compile.compile_entry's result) unfit to ship: a failed compile,
    spills (beyond FP32_SPILL_ALLOWANCE_BYTES for fp32), too much shared memory, on sm_90 with aligned operands
    matrix products left to mma.sync instead of wgmma, or on sm_90 warpgroups that duplicate work."""
    if "error" in result:
        return [f"does not compile: {result['error'].splitlines()[0]}"]
    found = []
    if result["arch"] == 90 and result["aligned"] and result["mma_sync"] and not result["wgmma"]:
        found.append("mma.sync where sm_90 has wgmma")
    if result["arch"] == 90 and result.get("duplicated"):
        found.append("warpgroups duplicate work (fewer than 64 rows per warpgroup)")
    spill_allowed = FP32_SPILL_ALLOWANCE_BYTES if result.get("dtype") == "float32" else 0
    if max(result["spill_store_bytes"], result["spill_load_bytes"]) > spill_allowed:
        found.append(f"spills {result['spill_store_bytes']} B stored / {result['spill_load_bytes']} B loaded")
    for arch in _archs_running(result["arch"]):
        if result["shared_bytes"] > MAX_SHARED_BYTES[arch]:
            found.append(f"needs {result['shared_bytes']} B of shared memory, sm_{arch} allows "
                         f"{MAX_SHARED_BYTES[arch]}")
    return found


def _archs_running(arch):
    """The architectures that run code compiled for `arch`: sm_80's code runs on sm_86 and sm_89 too."""
    from kernels._gpu import ARCHS_RUNNING_SM80_CODE

    return (arch, *ARCHS_RUNNING_SM80_CODE) if arch == 80 else (arch,)
