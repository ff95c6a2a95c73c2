"""The project's offline tools, run from the checkout like bench/ (not installed with the package):
    tools/tiles/   the tile toolchain: which tiles the kernels ship, what the compiler makes of them, which to try
"""
