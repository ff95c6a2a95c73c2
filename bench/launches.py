"""Triton launches stubbed out and counted: how bench.host times the host side of a call on a CPU without running
a kernel, and how the tests count the launches of a training step.

`kernel[grid](...)` calls `run(*args, grid=grid, warmup=False, **kwargs)` on the kernel object, a JITFunction (or,
under TRITON_INTERPRET=1, an InterpretedFunction). `stubbed_launches()` replaces `run` on both classes: everything
our code does up to the launch runs (checks, allocation, tile lookup, the arguments, `kernel[grid]`), nothing after
it. What that leaves out of a measurement is Triton's own per-launch work inside JITFunction.run:
- the binder: the arguments bound to the signature and specialised (types, 16-byte alignment, the cache key), and
  the compiled kernel looked up; `binder_us` times it on a CPU, for sm_90, on a call's recorded arguments;
- the launcher: the launch metadata and the driver's cuLaunchKernel, measurable only on a GPU.
"""

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_KERNEL_CLASSES = (JITFunction, InterpretedFunction)


@dataclass
class Launches:
    """What the stub saw: launches per kernel name, and (with record) each launch's kernel, args and kwargs."""

    counts: Counter = field(default_factory=Counter)
    recorded: list = field(default_factory=list)
    record: bool = False

    def total(self):
        return sum(self.counts.values())


def kernel_name(kernel):
    return kernel.fn.__name__


@contextlib.contextmanager
def stubbed_launches(record=False):
    """Within the block no Triton kernel runs: every launch is counted by kernel name (and, with record, kept with
    its arguments for binder_us). Yields the Launches."""
    launches = Launches(record=record)

    def run(kernel, *args, grid, warmup, **kwargs):
        launches.counts[kernel_name(kernel)] += 1
        if launches.record:
            launches.recorded.append((kernel, args, kwargs))

    originals = [(cls, cls.__dict__["run"]) for cls in _KERNEL_CLASSES]
    for cls, _ in originals:
        cls.run = run
    try:
        yield launches
    finally:
        for cls, original in originals:
            cls.run = original


def _binder_of(kernel, backend):
    """The binder JITFunction.run would call for `kernel` (a JITFunction or an interpreted one) on `backend`, and
    the kernel's (empty) cache-key memo, as JITFunction.create_binder makes them."""
    from triton.runtime.jit import create_function_from_signature

    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
    return create_function_from_signature(jit.signature, jit.params, backend), {}


def binder_us(recorded, repeats=200):
    """Microseconds Triton's binder takes for the recorded launches of one call, all of them (the median of
    `repeats` passes): each launch's arguments bound and specialised for sm_90 and its cache key computed, exactly
    the part of JITFunction.run before the compiled kernel is found and launched."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders = {}
    calls = []
    for kernel, args, kwargs in recorded:
        if kernel_name(kernel) not in binders:
            binders[kernel_name(kernel)] = _binder_of(kernel, backend)
        options = dict(kwargs, debug=kwargs.get("debug", False) or knobs.runtime.debug,
                       instrumentation_mode=knobs.compilation.instrumentation_mode)
        calls.append((*binders[kernel_name(kernel)], args, options))

    def bind_all():
        for binder, key_cache, args, options in calls:
            _, specialization, options = binder(*args, **options)
            compute_cache_key(key_cache, specialization, options)

    bind_all()  # the cache-key memo filled, as after a kernel's first launch
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        bind_all()
        times.append(time.perf_counter_ns() - start)
    return sorted(times)[len(times) // 2] / 1e3
