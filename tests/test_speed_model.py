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
    clocks, limiter = speed_model.block_clocks(loop, 90, num_warps=8, block_m=128, block_n=64)
    scale = 128 * 128 / (128 * 64)
    assert clocks["tensor"] == 2 * (64 * 64 * 16 + 64 * 128 * 16) / 2048 * scale
    assert clocks["MUFU"] == 2 * 32 * 8 / 16 * scale
    assert clocks["issue"] == 7 * 8 / 4 * scale
    assert limiter == max(clocks, key=clocks.get)


def test_warpgroups_duplicate_work_below_64_rows_each():
    assert speed_model.duplicates_work("dkdv", block_m=16, block_n=64, num_warps=8)  # 64 keys for 2 warpgroups
    assert not speed_model.duplicates_work("dkdv", block_m=16, block_n=64, num_warps=4)
    assert not speed_model.duplicates_work("forward", block_m=128, block_n=32, num_warps=8)
