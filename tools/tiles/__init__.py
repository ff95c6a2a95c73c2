"""The tile toolchain: how the tiles in kernels/*/tiles.py are checked, searched, ranked and timed.

CPU commands (no GPU needed; each compiles for sm_90 and sm_80 with the Triton wheel's own compiler):
    python -m tools.tiles.report          every shipped config compiled: registers, spills, shared memory, wgmma,
                                          the speed model's clocks -> bench/results/compile_report.md
    python -m tools.tiles.search          a clean replacement for every tile the report rejects
    python -m tools.tiles.search --rank   the headline launches' tiles ranked by the speed model
                                          -> bench/results/model_ranking.json
GPU commands:
    python -m tools.tiles.tune            the ranking's best tiles timed against the shipped ones (--dry-run on CPU)
    bash tools/tiles/gpu_run.sh           the whole run for a short GPU slot: CUDA tests, tune, then bench.suite

The modules, each importing only those below it (and bench.common, for the results folder and the timing):
    tune         times the ranking's tiles on a GPU
    report       the compiles rendered: every config with its problems, the headline launches against the goals
    search       the clean-tile search and the speed model's ranking (HEADLINE_LAUNCH: the launches it ranks)
    checks       what makes a compiled config unfit to ship (problems), for report, search and the tests
    compile      one config compiled for one arch and read back (ptxas -v, cuobjdump); the worker pool
    configs      every config the ops ship, built from the kernels' tile tables; a config's key rebuilds it
    speed_model  a leaf: clocks per 128 x 128 block read off a kernel's SASS
"""
