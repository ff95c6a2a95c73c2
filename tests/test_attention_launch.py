"""How attention is launched: every tile the tables can give is compiled by the compile report, operand alignment,
the tile picked per GPU, the grid, the device, 32-bit offsets, GPUs too old for the tiles."""

import itertools

import pytest
import torch


def test_every_launch_the_table_can_make_is_compiled_by_the_report():
    """Every tile the launch table can give, for every head size, dtype, dropout, checked arch and alignment, is
    among the configs the compile report compiles under each of its masks (checked for spills in
    test_compile_report)."""
    from kernels._gpu import CHECKED_ARCHS
    from kernels.attention import backward, forward, tiles
    from tools.tiles import configs

    entries = configs.attention_configs()
    assert len({e["name"] for e in entries}) == len(entries)
    mask_names = ("BOUNDED_LEFT", "BOUNDED_RIGHT", "VARLEN", "EVEN")
    block_names = ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "DK_DV_APART", "HEAD_SLICES")
    shipped = set()
    for e in entries:
        assert set(e["signature"]) == set(e["kernel"].arg_names), e["name"]
        assert all(e["signature"][name] == "constexpr" for name in e["constexprs"]), e["name"]
        c = e["constexprs"]
        pointer = e["signature"][e["kernel"].arg_names[0]]  # the dtype of the first tensor argument
        for arch, aligned in e["targets"]:
            assert c["ALIGNED"] == aligned, e["name"]
            shipped.add((e["kernel"], pointer, c["BLOCK_D"], *(c.get(name) for name in block_names),
                         c.get("DROPOUT"), *(c.get(name) for name in mask_names), e["num_warps"], e["num_stages"],
                         arch, aligned))
    kernel_of = {"forward": forward.attention_forward_kernel, "backward": backward.attention_backward_kernel}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in range(1, tiles.MAX_HEAD_SIZE + 1):
            block_d = tiles.block_d(head_dim)
            for dropout, arch, aligned, mask in itertools.product(
                    (False, True), CHECKED_ARCHS, (True, False), configs.ATTENTION_MASKS.values()):
                for name in kernel_of:
                    if not aligned and tiles.copies_misaligned_operands(name, head_dim, tiles.precision(dtype)):
                        continue  # copied aligned first
                    tile = tiles.table_tile(name, head_dim, dtype, dropout, arch, aligned)
                    blocks = dict(zip(("BLOCK_M", "BLOCK_N"), tile[:2])) if name == "forward" else \
                        dict(zip(block_names[2:], (*tile[:4], tile.dk_dv_apart, tiles.head_slices(tile, head_dim))))
                    key = (kernel_of[name], configs.POINTER_TYPES[str(dtype).removeprefix("torch.")], block_d,
                           *(blocks.get(block) for block in block_names), dropout,
                           *(mask[name] for name in mask_names), tile.num_warps, tile.num_stages, arch, aligned)
                    assert key in shipped, (f"{name} {dtype} D={head_dim} dropout={dropout} sm_{arch} "
                                            f"aligned={aligned} {mask} is not compiled by the report")


def test_operand_alignment_means_16_byte_rows(device):
    from kernels.attention.shared import operands_aligned

    x = torch.randn(2, 3, 40, 64, device=device)
    assert operands_aligned(x, x.transpose(1, 2))
    assert operands_aligned(torch.randn(2, 3, 40, 40, device=device, dtype=torch.float16))  # rows of 80 bytes
    assert not operands_aligned(torch.randn(2, 3, 40, 36, device=device, dtype=torch.float16))  # rows of 72
    shifted = torch.randn(x.numel() + 1, device=device)[1:].view(x.shape)
    assert shifted.stride() == x.stride() and not operands_aligned(shifted)  # a pointer 4 bytes past alignment
    assert not operands_aligned(x.transpose(2, 3))  # a last dimension that is not contiguous


def test_launch_config_picks_the_tile_for_the_gpu_and_the_operands(monkeypatch):
    """The launcher's choice on a (pretend) H100 and A100: the table's tile for the arch and alignment, the sm_90
    wgmma tile at head size 256 only for aligned operands."""
    from kernels._gpu import device_arch
    from kernels.attention import tiles

    try:
        for capability, arch in (((9, 0), 90), ((8, 0), 80)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, capability=capability: capability)
            device_arch.cache_clear()  # asked once per device: forget the previous pretend GPU's answer
            for aligned in (True, False):
                expected = tiles.table_tile("forward", 256, torch.bfloat16, False, arch, aligned)
                assert tiles.launch_tile("forward", 256, torch.bfloat16, False, torch.device("cuda"), aligned) == \
                    expected
    finally:
        device_arch.cache_clear()
    assert tiles.table_tile("forward", 256, torch.bfloat16, False, 90, True) != \
        tiles.table_tile("forward", 256, torch.bfloat16, False, 90, False)


def test_the_grid_is_one_axis_with_no_65535_program_limit():
    """Batch x heads beyond 65535 (4096 sequences of 16 heads at short lengths) fit: programs run on one grid axis
    (2**31 - 1 programs), blocks of a head's sequence first. A unit test of the grid the launcher computes: a
    65k-program interpreter run would take minutes."""
    from kernels.attention.ops import _Launch

    q = torch.empty(4096, 16, 256, 64, device="meta")
    launch = _Launch(q, q, None, None, 256, 256, -1, 0)
    (programs,) = launch.grid(launch.n_q, launch.heads, 128)
    assert programs == 2 * 4096 * 16 > 65535


def test_every_launch_runs_on_the_inputs_device(device, monkeypatch):
    """Triton launches on the current device; every attention and LayerNorm launch makes the inputs' device
    current first (tensors on cuda:1 while cuda:0 is current would otherwise run on the wrong GPU)."""
    import kernels._gpu
    from kernels import add_layer_norm, attention, attention_dropout_mask, layer_norm
    from kernels.attention import ops as attention_ops
    from kernels.layer_norm import ops as layer_norm_ops

    entered = []
    real_launch_device = kernels._gpu.launch_device

    def recording(tensor):
        entered.append(tensor.device)
        return real_launch_device(tensor)

    for module in (attention_ops, layer_norm_ops):
        monkeypatch.setattr(module, "launch_device", recording)
    q = torch.randn(1, 2, 8, 16, device=device, requires_grad=True)
    attention(q, q, q, dropout_p=0.1).sum().backward()
    attention_dropout_mask(q, q, 0.1)
    x = torch.randn(3, 8, device=device, requires_grad=True)
    layer_norm(x).sum().backward()
    add_layer_norm(x, x)[0].sum().backward()
    assert entered == [q.device] * 3 + [x.device] * 4  # attention: forward, backward, mask


def test_the_backward_launch_caps_registers_as_the_report_compiles_it(device, monkeypatch):
    """The backward launch passes the register cap (maxnreg) the compile report compiles its config with: capped
    for fp32 at head size 128 with misaligned operands (rows of 97 floats), left to ptxas elsewhere."""
    from kernels import attention
    from kernels.attention import ops as attention_ops
    from kernels.attention import shared, tiles
    from tools.tiles import configs

    real_kernel = attention_ops.attention_backward_kernel
    caps = []

    class Recording:
        def __getitem__(self, grid):
            def launch(**arguments):
                caps.append(arguments.get("maxnreg"))
                return real_kernel[grid](**arguments)
            return launch

    monkeypatch.setattr(attention_ops, "attention_backward_kernel", Recording())
    for head_dim, dtype in ((97, torch.float32), (128, torch.float32), (97, torch.float16), (250, torch.float32)):
        q = torch.randn(1, 2, 8, head_dim, device=device, dtype=dtype, requires_grad=True)
        attention(q, q, q).sum().backward()
        aligned = shared.operands_aligned(q) or \
            tiles.copies_misaligned_operands("backward", head_dim, tiles.precision(dtype))
        tile = tiles.launch_tile("backward", head_dim, dtype, False, q.device, aligned)
        entry = configs.attention_config(str(dtype).removeprefix("torch."), tiles.block_d(head_dim), "backward",
                                         "causal", False, tile, aligned, (tiles.launch_arch(q.device),))
        assert caps[-1] == entry["options"].get("maxnreg"), (head_dim, dtype, aligned)
    assert caps[0] == 255


def test_sequences_whose_rows_lie_2_31_elements_apart_are_copied_or_refused():
    """The kernels' offsets inside one sequence are 32-bit: a view whose rows lie further apart is copied head by
    head; an output that would is laid out head by head; a single head too long even then is a clear error.
    Checked on meta tensors: nothing this size is allocated."""
    from kernels.attention.api import _heads_apart
    from kernels.attention.ops import _allocate_forward_outputs, rows_fit
    from kernels.attention.ops import readable as _readable

    wide_rows = torch.empty_strided((1, 1, 4096, 64), (0, 64, 2**20, 1), device="meta")  # 2**32 apart in total
    assert not rows_fit(wide_rows, wide_rows.stride(2), 4096)
    copied = _readable(wide_rows, wide_rows.stride(2), 4096, wide_rows.contiguous)
    assert copied.stride(2) == 64
    packed = torch.empty_strided((40000, 4, 64), (2**16, 64, 1), device="meta")
    apart = _readable(packed, packed.stride(0), 40000, lambda: _heads_apart(packed))
    assert apart.stride() == (64, 40000 * 64, 1)
    with pytest.raises(ValueError, match="beyond the kernels' 32-bit offsets"):
        too_long = torch.empty((1, 1, 2**25, 64), device="meta")
        _readable(too_long, too_long.stride(2), 2**25, too_long.contiguous)
    # Outputs: heads side by side (B, Nq, H, D) while that fits, else head by head.
    out, _ = _allocate_forward_outputs(torch.empty(1, 8, 1000, 64, device="meta"), False, 1000)
    assert out.stride(2) == 8 * 64
    out, _ = _allocate_forward_outputs(torch.empty(1, 64, 2**19, 128, device="meta"), False, 2**19)
    assert out.stride(2) == 128


def test_gpus_older_than_ampere_are_refused_clearly(monkeypatch):
    """sm_75 (T4, RTX 20xx) has too little shared memory for the tiles: a clear error, not a Triton crash."""
    import types

    import kernels._validate

    monkeypatch.setattr(kernels._validate, "device_arch", lambda device: 75)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    on_a_t4 = types.SimpleNamespace(device=torch.device("cuda", 0), is_cuda=True, is_cpu=False)
    with pytest.raises(ValueError, match="Tesla T4 .compute capability 7.5.; the kernels need compute capability 8.0"):
        kernels._validate.check_runnable("q", on_a_t4)


def test_exactly_one_tile_rule_matches_every_launch():
    """The tile table is explicit: no launch is matched by two rules (no order decides between them), none by
    zero, and no rule is dead. Every rule says why its tile is what it is, and how it was chosen."""
    from kernels.attention import tiles

    used = set()
    for key in itertools.product(("16bit", "fp32"), (16, 32, 64, 128, 256), ("forward", "backward"), (False, True),
                                 (90, 80), (True, False)):
        launch = dict(zip(tiles.FIELDS, key))
        matching = [rule for rule in tiles.TABLE.rules if rule.matches(launch)]
        if not launch["aligned"] and tiles.copies_misaligned_operands(launch["kernel"], launch["head"],
                                                                        launch["precision"]):
            assert not matching, launch  # never launched: its operands are copied aligned first
            continue
        assert len(matching) == 1, (launch, matching)
        used.add(id(matching[0]))
    assert used == {id(rule) for rule in tiles.TABLE.rules}
    assert all(rule.why and rule.chosen_by in ("timed", "model", "fit", "flex") for rule in tiles.TABLE.rules)


def test_the_interpreter_runs_the_tiles_an_sm90_card_runs():
    """On CPU the launchers ask the table for sm_90's tiles (and the tests force the other shipped shapes through
    its override): the band arithmetic is checked at the block shapes a GPU runs."""
    from kernels.attention import tiles

    cpu = torch.device("cpu")
    for kernel, dtype, dropout, aligned in itertools.product(("forward", "backward"), (torch.float16, torch.float32),
                                                             (False, True), (True, False)):
        assert tiles.launch_tile(kernel, 64, dtype, dropout, cpu, aligned) == \
            tiles.table_tile(kernel, 64, dtype, dropout, 90, aligned)


def test_dk_and_dv_have_programs_of_their_own_where_their_accumulators_do_not_fit_together():
    """dK and dV share a key program wherever the table's backward tile says so and are computed by programs of
    their own elsewhere (head size 256 always; 128 on sm_90 too, see the table): both run on CPU."""
    from kernels.attention import tiles

    bf16 = torch.bfloat16
    assert not tiles.table_tile("backward", 64, bf16, False, 90, True).dk_dv_apart
    assert all(tiles.table_tile("backward", 256, dtype, dropout, arch, aligned).dk_dv_apart
               for dtype, dropout, arch, aligned in itertools.product((bf16, torch.float32), (False, True), (90, 80),
                                                                      (True, False))
               if aligned or not tiles.copies_misaligned_operands("backward", 256, tiles.precision(dtype)))


def test_override_forces_a_tile_on_the_matching_launches_for_the_block_only():
    """tiles.override, what tools.tiles.tune times candidates with: the launches it matches get its tile inside the
    block (every arch and alignment), the others and every launch after the block get the table's; a key no rule
    matches is a LookupError naming it."""
    from kernels.attention import tiles

    cpu, forced = torch.device("cpu"), tiles.Tile(16, 128, 4, 1)
    shipped = {kernel: tiles.launch_tile(kernel, 64, torch.float16, False, cpu, True) for kernel in ("forward",
                                                                                                       "backward")}
    with tiles.override(forced, precision="16bit", head=64, kernel="forward"):
        assert tiles.launch_tile("forward", 64, torch.float16, False, cpu, True) == forced
        assert tiles.table_tile("forward", 64, torch.bfloat16, True, 80, False) == forced
        assert tiles.launch_tile("forward", 128, torch.float16, False, cpu, True) != forced
        assert tiles.launch_tile("backward", 64, torch.float16, False, cpu, True) == shipped["backward"]
    assert tiles.launch_tile("forward", 64, torch.float16, False, cpu, True) == shipped["forward"]
    with pytest.raises(LookupError, match="head=512"):
        tiles.TABLE.lookup(precision="16bit", head=512, kernel="forward", dropout=False, arch=90, aligned=True)
