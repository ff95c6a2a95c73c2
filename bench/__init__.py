"""Benchmarks of the kernels against what a user would pick instead (the tile toolchain, which checks and times the
kernels' tiles, is tools/tiles/).

GPU commands (each refuses plainly on a machine without CUDA):
    python -m bench.attention       forward / backward TFLOP/s against PyTorch's SDPA backends, eager, FlexAttention
    python -m bench.decode          decoding from a key/value cache: GB/s read, against SDPA and the copy ceiling
    python -m bench.layernorm       LayerNorm and add+LayerNorm GB/s against F.layer_norm (eager and compiled)
    python -m bench.train           GPT training tokens/s and peak memory per backend
    python -m bench.suite           the CUDA test suite, then every benchmark, then the plots
CPU commands:
    python -m bench.host            the host's cost per call of every op against torch's own (also on a GPU)
    python -m bench.plot DIR        PNG plots from the JSON a GPU run wrote (needs matplotlib)
    python -m bench.workcount       bytes moved / distinct bytes / matrix products per launch at sm_90 launch
                                    parameters, as ratios to the minimum (Triton's interpreter)
"""
