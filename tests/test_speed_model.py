"""tools/tiles/speed_model.py: reading a loop off SASS and costing it by the model, on a hand-written listing."""

from tools.tiles import speed_model

# A loop (0x0040 ... 0x00a0) of one SS and one RS wgmma, two exp2, a 128-bit shared load and an asynchronous copy,
# and outside it a second, longer loop without matrix work and a self-branch (the exit trap).
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], R88 ;
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, R120, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0060*/                   MUFU.EX2 R2, R2 ;
        /*0070*/                   MUFU.EX2 R3, R3 ;
        /*0080*/                   LDS.128 R4, [R5] ;
        /*0090*/                   LDGSTS.E.BYPASS.128 [R6], desc[UR20][R8.64] ;
        /*00a0*/              @!P0 BRA 0x40 ;
        /*00b0*/                   FADD R1, R1, R2 ;
        /*00c0*/                   FADD R1, R1, R2 ;
        /*00d0*/              @P1 BRA 0xb0 ;
        /*00e0*/                   BRA 0xe0 ;
"""


def test_the_main_loop_is_the_innermost_loop_with_matrix_work():
    instructions = speed_model.parse(SASS)
    assert [instructions[first][0] for first, _ in speed_model.innermost_loops(instructions)] == [0x40, 0xB0]
    loop = speed_model.main_loop(SASS)
    assert loop.instructions == 7 and loop.mufu == 2 and loop.wgmma == ("64x128x16RS", "64x64x16SS")
    assert loop.tensor_fma_per_warpgroup == 64 * 64 * 16 + 64 * 128 * 16
    # SS reads A (64 x 16) and B (64 x 16), RS only B (128 x 16), 2 bytes each; LDS.128 and LDGSTS.128: 16 B a lane
    assert loop.shared_bytes_per_warpgroup == 2 * 16 * (64 + 64) + 2 * 16 * 128
    assert loop.shared_bytes_per_warp == 2 * 32 * 16


def test_block_clocks_scale_each_unit_to_a_128_by_128_block():
    loop = speed_model.main_loop(SASS)
    clocks, limiter = speed_model.block_clocks(loop, 90, num_warps=8, pairs=128 * 64)
    scale = 128 * 128 / (128 * 64)
    assert clocks["tensor"] == 2 * (64 * 64 * 16 + 64 * 128 * 16) / 2048 * scale
    assert clocks["MUFU"] == 2 * 32 * 8 / 16 * scale
    assert clocks["issue"] == 7 * 8 / 4 * scale
    assert limiter == max(clocks, key=clocks.get)


def test_a_kernels_loops_are_known_by_their_matrix_work():
    """The loop doing a given number of multiply-adds per iteration: the listing's loop, 64 x 64 x 16 + 64 x 128 x
    16 per warpgroup, is found by its total over 8 warps (2 warpgroups) and by nothing else."""
    per_warpgroup = 64 * 64 * 16 + 64 * 128 * 16
    assert speed_model.main_loop(SASS, 8, 2 * per_warpgroup).instructions == 7
    assert speed_model.main_loop(SASS, 8, per_warpgroup) is None


def test_the_backward_is_modelled_as_its_key_and_query_loops():
    """The backward's loops: the key programs' 4 products (3 and 2 with dK and dV apart), the query programs' 3."""
    from kernels.attention.tiles import BackwardTile

    together = BackwardTile(64, 128, 128, 64, 8, 2, False)
    assert speed_model.kernel_loops("backward", together, 64) == [(4 * 8192 * 64, 8192), (3 * 8192 * 64, 8192)]
    apart = together._replace(block_m1=32, dk_dv_apart=True)
    assert speed_model.kernel_loops("backward", apart, 64) == [
        (3 * 4096 * 64, 4096), (2 * 4096 * 64, 4096), (3 * 8192 * 64, 8192)]


def test_warpgroups_duplicate_work_below_64_rows_each():
    from kernels.attention.tiles import BackwardTile, Tile

    assert speed_model.duplicates_work("backward", BackwardTile(16, 64, 128, 16, 8, 2, False))  # 64 keys, 2 groups
    assert not speed_model.duplicates_work("backward", BackwardTile(16, 64, 64, 16, 4, 2, False))
    assert speed_model.duplicates_work("backward", BackwardTile(16, 128, 64, 16, 8, 2, False))  # 64 queries
    assert not speed_model.duplicates_work("forward", Tile(128, 32, 8, 3))
    assert speed_model.duplicates_work("forward", Tile(64, 32, 8, 3))
