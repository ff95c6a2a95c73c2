"""Work counts of the kernels at an sm_90 card's launch parameters, on CPU: what every launch loads, stores and
multiplies, as ratios to what the op needs, so structural waste shows without a GPU.

    python -m bench.workcount [--op attention|layer_norm|add_layer_norm|rms_norm|add_rms_norm ...] [--markdown FILE]

The kernels run under Triton's interpreter, with the launchers answering as on an H100 or H200: sm_90 tiles and 132
multiprocessors (`gpu_launch_parameters`, the one place that knows how the launchers choose). The interpreter's
loads, stores and tl.dot are counted per launch:

- bytes moved: the elements each load, store or atomic touches where its mask is true, times their size;
- distinct bytes: the union of the byte ranges a launch reads plus the union of those it writes, i.e. what DRAM
  would move if the launch cached perfectly (every launch starts cold);
- matrix-product FLOPs: 2 * M * N * K per tl.dot at the launched tile. For attention, the (query, key) pairs of
  each product are classified by where its operands were loaded from (`_Sequences`): visible (inside the band),
  masked out (outside it) or padding (a query or key past its sequence's end); "unclassified" when no pair of
  query and key axes could be traced to the product;
- torch-side work between the launches (zero-fills, partial sums, casts, copies): each aten op reads its inputs
  and writes its outputs once; views and allocations are free.

Ratios are to what an op needs: each input read once and each output written once. Attention forward: q, k, v in;
out and the fp32 log-sum-exp per query row out. Attention backward: grad_out, q, k, v, out, log-sum-exp in; dq,
dk, dv out. LayerNorm forward: x (and residual), weight, bias in; y (and the sum s), the fp32 mean and 1/std per
row out. LayerNorm backward: dy (and the sum's own gradient), the normalized input, weight, mean, 1/std in; dx,
dweight, dbias out. Attention's products are given per visible (query, key) pair: FLOPs / (2 * head size *
visible pairs); the minimum is 2 in the forward (Q K^T, P V) and 5 in the backward (Q K^T, dO V^T, dV, dK, dQ).

The interpreter takes seconds per row of a wide LayerNorm, so LayerNorm is counted at a few small row and
multiprocessor counts and extrapolated to the target (`_norm_at_scale`): every count must be affine in the rows and
the programs of the pass's persistent grid (each program costs its own weight loads and partial-sum stores), which
is checked exactly on the samples, and the target's own launches (run with their programs skipped) must have the
grids the extrapolation predicts. Their torch-side work is counted there, exactly.
"""

import os
import sys

if "triton" not in sys.modules:  # else record() says that nothing ran in the interpreter
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run in its interpreter

import argparse  # noqa: E402
import contextlib  # noqa: E402
import inspect  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from collections import Counter, namedtuple  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from fractions import Fraction  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

import kernels  # noqa: E402
from kernels._library import NAMESPACE  # noqa: E402
from kernels.attention import tiles as attention_tiles  # noqa: E402
from kernels.layer_norm import tiles as norm_tiles  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# The launch parameters of an sm_90 card. On CPU the attention launchers already pick the tables' sm_90 tiles
# (kernels/attention/tiles.py: INTERPRETER_ARCH); what a CPU has no answer to, the multiprocessors, is made an
# H100/H200's here, the one place that knows which functions the launchers ask. Update it when they change.

ARCH = 90
MULTIPROCESSORS = 132  # H100 SXM and H200


@contextlib.contextmanager
def gpu_launch_parameters(multiprocessors=MULTIPROCESSORS, min_backward_rows=None):
    """Inside the block the launchers pick what they pick on an sm_90 card with `multiprocessors` SMs: the attention
    tables' sm_90 tiles (aligned or not, as the call's operands are; what the interpreter runs anyway) and the
    multiprocessors the LayerNorm grids are sized for (its tiles are the same on CPU). min_backward_rows, when
    given, replaces the least rows a LayerNorm backward program takes (the extrapolation's samples take 1, so that
    their grids vary at few rows)."""
    if attention_tiles.INTERPRETER_ARCH != ARCH:
        raise RuntimeError(f"the interpreter runs sm_{attention_tiles.INTERPRETER_ARCH}'s attention tiles, not "
                           f"sm_{ARCH}'s: make gpu_launch_parameters force sm_{ARCH}'s")
    patches = [(norm_tiles, "multiprocessors", lambda device: multiprocessors)]
    if min_backward_rows is not None:
        patches.append((norm_tiles, "MIN_BACKWARD_ROWS_PER_PROGRAM", min_backward_rows))
    with _patched(patches):
        yield


@contextlib.contextmanager
def _patched(patches):
    """setattr(owner, name, value) for each (owner, name, value) inside the block, restored after it."""
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(originals):
            setattr(owner, name, value)


# --------------------------------------------------------------------------------------------------------------
# What was counted


@dataclass
class LaunchCount:
    """One kernel launch. operands: per tensor argument, {"loaded", "stored": bytes moved; "read", "written":
    distinct bytes} (a tensor passed as several arguments, e.g. as a stand-in for an unused pointer, is one operand
    named "A/B"). flops: matrix-product FLOPs by the (query, key) pairs they were spent on: "visible", "masked",
    "padding" or "unclassified"."""

    kernel: str
    grid: tuple
    tile: str
    operands: dict = field(default_factory=dict)
    flops: Counter = field(default_factory=Counter)

    @property
    def moved(self):
        return sum(o["loaded"] + o["stored"] for o in self.operands.values())

    @property
    def distinct(self):
        return sum(o["read"] + o["written"] for o in self.operands.values())


@dataclass
class TorchWork:
    """One aten op run between the launches: bytes read and written."""

    op: str
    read: int
    written: int


@dataclass
class Phase:
    """What one pass of an op did (e.g. attention backward at one shape): its launches, its torch-side work, and
    what it needs. pair_flops: 2 * head size * visible (query, key) pairs, the FLOPs of one matrix product per
    visible pair (attention only); minimum_products: the fewest products per visible pair the pass can do."""

    op: str
    case: str
    needed: int
    launches: list
    torch_work: list
    pair_flops: int = 0
    minimum_products: int = 0
    sample_rows: int = 0  # extrapolated from samples at this many rows and twice as many (_norm_at_scale)

    @property
    def torch_bytes(self):
        return sum(w.read + w.written for w in self.torch_work)

    @property
    def moved(self):
        return sum(launch.moved for launch in self.launches) + self.torch_bytes

    @property
    def distinct(self):
        return sum(launch.distinct for launch in self.launches) + self.torch_bytes

    def products(self, bucket=None):
        """Executed matrix products per visible pair (on pairs of `bucket` only, when given)."""
        flops = sum(launch.flops[bucket] if bucket else sum(launch.flops.values()) for launch in self.launches)
        return flops / self.pair_flops


# --------------------------------------------------------------------------------------------------------------
# Distinct bytes: unions of byte ranges


class ByteRanges:
    """A set of bytes, kept as sorted disjoint [start, end) ranges; ranges added are merged in batches."""

    _BATCH = 1 << 20

    def __init__(self):
        self._starts = np.empty(0, np.int64)
        self._ends = np.empty(0, np.int64)
        self._pending = []
        self._pending_count = 0

    def add(self, starts, ends):
        self._pending.append((starts, ends))
        self._pending_count += starts.size
        if self._pending_count > self._BATCH:
            self._merge()

    def size(self):
        self._merge()
        return int((self._ends - self._starts).sum())

    def _merge(self):
        if not self._pending:
            return
        starts = np.concatenate([self._starts] + [s for s, _ in self._pending])
        ends = np.concatenate([self._ends] + [e for _, e in self._pending])
        self._pending, self._pending_count = [], 0
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], ends[order]
        reach = np.maximum.accumulate(ends)
        # A range opens a new run where it starts past the end of every range before it.
        opens = np.ones(starts.size, dtype=bool)
        opens[1:] = starts[1:] > reach[:-1]
        first = np.flatnonzero(opens)
        self._starts = starts[first]
        self._ends = reach[np.append(first[1:] - 1, starts.size - 1)]


def _element_ranges(addresses, itemsize):
    """The byte ranges [start, end) of the elements at `addresses` (int64, each element itemsize bytes), one range
    per run of adjacent elements."""
    addresses = np.unique(addresses)
    breaks = np.flatnonzero(np.diff(addresses) != itemsize)
    starts = addresses[np.append(0, breaks + 1)]
    ends = addresses[np.append(breaks, addresses.size - 1)] + itemsize
    return starts, ends


# --------------------------------------------------------------------------------------------------------------
# Counting one launch


def _span(tensor):
    """The byte range [start, end) from a tensor's first element to its last."""
    start = tensor.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return start, start + (last + 1) * tensor.element_size()


class _Operand:
    """One tensor argument of the launch being counted: its byte range and what the launch did to it."""

    def __init__(self, name, start, end):
        self.name, self.start, self.end = name, start, end
        self.loaded = self.stored = 0
        self.read, self.written = ByteRanges(), ByteRanges()

    def count(self, addresses, itemsize, reads, writes):
        moved = addresses.size * itemsize
        ranges = _element_ranges(addresses, itemsize)
        if reads:
            self.loaded += moved
            self.read.add(*ranges)
        if writes:
            self.stored += moved
            self.written.add(*ranges)

    def counts(self):
        return {"loaded": self.loaded, "stored": self.stored, "read": self.read.size(), "written": self.written.size()}


class _LaunchCounter:
    """Counts the launch of `fn` (a Triton kernel's function) with the host arguments `arguments` (name -> value)."""

    OUTSIDE = "(outside every argument)"

    def __init__(self, fn, arguments, launch_options):
        self.kernel = fn.__name__
        self.grid = None
        self.flops = Counter()
        self.tile = ", ".join([f"{name} {value}" for name, value in arguments.items()
                               if (name.startswith("BLOCK") or name == "ROWS") and type(value) is int]
                              + [f"{launch_options[name]} {name[4:]}" for name in ("num_warps", "num_stages")
                                 if name in launch_options])
        by_range = {}
        for name, value in arguments.items():
            tensor = value.base if isinstance(value, TensorDescriptor) else value
            if isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
                by_range.setdefault(_span(tensor), []).append(name)
        self.operands = [_Operand("/".join(names), start, end) for (start, end), names in sorted(by_range.items())]
        self.starts = np.array([o.start for o in self.operands], dtype=np.int64)
        self.outside = _Operand(self.OUTSIDE, 0, 0)

    def count_access(self, pointers, mask, reads, writes):
        """A load (reads), store (writes) or atomic (both) of the elements at `pointers` (a TensorHandle of
        addresses) where `mask` is true."""
        itemsize = max(1, pointers.get_element_ty().primitive_bitwidth // 8)
        addresses = pointers.data.astype(np.int64)
        mask = np.asarray(mask, dtype=bool)  # the interpreter's masks may be int32 (0 / 1), which would index
        addresses = addresses[np.broadcast_to(mask, addresses.shape)]
        if addresses.size == 0:
            return
        owner = np.searchsorted(self.starts, addresses, side="right") - 1
        owners = np.unique(owner)
        for index in owners:
            mine = addresses if owners.size == 1 else addresses[owner == index]
            operand = self.operands[index] if index >= 0 else self.outside
            inside = mine < operand.end
            if not inside.all():
                self.outside.count(mine[~inside], itemsize, reads, writes)
                mine = mine[inside]
            if mine.size:
                operand.count(mine, itemsize, reads, writes)

    def result(self):
        operands = [o for o in self.operands + [self.outside] if o.loaded or o.stored]
        return LaunchCount(self.kernel, self.grid, self.tile, {o.name: o.counts() for o in operands}, self.flops)


# --------------------------------------------------------------------------------------------------------------
# Which (query, key) pairs a product covers. A tile loaded from a registered attention operand gets its row axis
# labelled with each row's sequence, position and padding (_Axis); the labels follow the tile through elementwise
# ops, transposes, broadcasts and tl.dot, so each product's query axis and key axis are known and its pairs are
# classified against the band.

_AXES = "workcount.axes"  # the key of the labels in TensorHandle.attr: one _Axis or None per dimension

# kind: "query" or "key"; sequence: the batch (or packed sequence) of each index; position: each key's position,
# or each query's position shifted by Nk - Nq (so that query i sees key j where left <= j - position <= right);
# padding: indexes whose whole row was masked out or lies past the sequence.
_Axis = namedtuple("_Axis", "sequences kind sequence position padding")


class _Sequences:
    """The queries and keys of one attention call: its band and where its operands' rows lie in memory.

    queries, keys: tensors whose rows are the call's queries (q, out, grad_out) or keys (k, v): dense (B, H, N, D)
    or, with cu_seqlens (the (cu_seqlens_q, cu_seqlens_k) pair), packed (total, H, D). band: (left, right) of the
    visible band, -1 for an unbounded side."""

    def __init__(self, queries, keys, band, cu_seqlens=None):
        self.band = band
        if cu_seqlens is None:
            n_q, n_k = queries[0].shape[2], keys[0].shape[2]
            self.starts = None
            self.lengths = {"query": np.array([n_q]), "key": np.array([n_k])}
        else:
            self.starts = {kind: c.cpu().numpy().astype(np.int64) for kind, c in zip(("query", "key"), cu_seqlens)}
            self.lengths = {kind: np.diff(starts) for kind, starts in self.starts.items()}
        self.operands = [(kind, t) for kind, tensors in (("query", queries), ("key", keys)) for t in tensors]

    def label(self, pointers, mask):
        """The axes of a tile loaded from `pointers` where `mask` is true, or None if it is no operand's."""
        addresses = pointers.data.astype(np.int64)
        if addresses.ndim == 0 or not mask.any():
            return None
        first = addresses[mask][0]
        for kind, tensor in self.operands:
            start, end = _span(tensor)
            if start <= first < end:
                return self._axes(kind, tensor, addresses, mask)
        return None

    def _axes(self, kind, tensor, addresses, mask):
        coordinates = _coordinates(tensor, addresses)
        packed = self.starts is not None
        rows = coordinates[0 if packed else 2]
        for axis in range(rows.ndim):
            lines = np.moveaxis(rows, axis, 0).reshape(rows.shape[axis], -1)
            if rows.shape[axis] > 1 and (lines == lines[:, :1]).all() and (lines[:, 0] != lines[0, 0]).any():
                break
        else:
            return None
        row = lines[:, 0]
        masked_out = ~np.moveaxis(mask, axis, 0).reshape(rows.shape[axis], -1).any(axis=1)
        if packed:
            sequence = np.searchsorted(self.starts[kind], row, side="right") - 1
            sequence = np.clip(sequence, 0, len(self.lengths[kind]) - 1)
            position = row - self.starts[kind][sequence]
        else:
            sequence = np.moveaxis(coordinates[0], axis, 0).reshape(rows.shape[axis], -1)[:, 0]
            position = row
        length = self.lengths[kind][sequence if packed else 0]
        padding = masked_out | (position < 0) | (position >= length)
        if kind == "query":  # align the band bottom-right: query i sees key j near i + Nk - Nq
            position = position + self.lengths["key"][sequence if packed else 0] - length
        axes = [None] * rows.ndim
        axes[axis] = _Axis(self, kind, sequence, position, padding)
        return tuple(axes)

    def pairs(self, queries, keys):
        """(visible, masked, padding) counts of the (query, key) pairs of two labelled axes."""
        padding = queries.padding[:, None] | keys.padding[None, :] | (queries.sequence[:, None] != keys.sequence)
        relative = keys.position[None, :] - queries.position[:, None]
        visible = ~padding
        left, right = self.band
        if left >= 0:
            visible &= relative >= -left
        if right >= 0:
            visible &= relative <= right
        n_visible, n_padding = int(visible.sum()), int(padding.sum())
        return n_visible, padding.size - n_visible - n_padding, n_padding


def _coordinates(tensor, addresses):
    """Each dimension's index of the elements at `addresses` (element offsets decoded by the strides, largest
    first; addresses outside the tensor decode to indexes outside its shape)."""
    offsets = (addresses - tensor.data_ptr()) // tensor.element_size()
    coordinates = [np.zeros_like(offsets) for _ in tensor.shape]
    for stride, dim in sorted(((s, d) for d, s in enumerate(tensor.stride()) if tensor.shape[d] > 1), reverse=True):
        coordinates[dim] = offsets // stride
        offsets = offsets - coordinates[dim] * stride
    return coordinates


def _axes_of(handle):
    return handle.attr.get(_AXES) if isinstance(handle, interpreter.TensorHandle) else None


def _product_flops(a, b, out):
    """The FLOPs of out = a @ b by bucket: the pairs of its query and key axes classified, or all unclassified."""
    shape = (*a.data.shape, b.data.shape[-1])  # (..., M, K, N)
    flops = 2 * int(np.prod(shape))
    a_axes, b_axes = _axes_of(a), _axes_of(b)
    if a.data.ndim != 2 or a_axes is None or b_axes is None:
        return {"unclassified": flops}
    # (axis, size) of the product's rows, columns and inner (summed) dimension
    rows, inner, columns = (a_axes[0], shape[0]), (a_axes[1] or b_axes[0], shape[1]), (b_axes[1], shape[2])
    by_kind = {}
    for axis, size in (rows, inner, columns):
        if axis is not None:
            by_kind.setdefault(axis.kind, []).append((axis, size))
    queries, keys = by_kind.get("query", []), by_kind.get("key", [])
    if len(queries) != 1 or len(keys) != 1 or queries[0][0].sequences is not keys[0][0].sequences:
        return {"unclassified": flops}
    (query_axis, n_q), (key_axis, n_k) = queries[0], keys[0]
    per_pair = flops // (n_q * n_k)  # 2 * the third dimension
    visible, masked, padding = query_axis.sequences.pairs(query_axis, key_axis)
    return {"visible": visible * per_pair, "masked": masked * per_pair, "padding": padding * per_pair}


# --------------------------------------------------------------------------------------------------------------
# The interpreter, instrumented: its builder's loads, stores, atomics and dots are counted, and the builder's
# other ops carry the axis labels from their operands to their results.


def _counted_load(load):
    def create_masked_load(self, pointers, mask, *args, **kwargs):
        value = load(self, pointers, mask, *args, **kwargs)
        recording = _RECORDING
        if recording is not None and recording.launch is not None:
            recording.launch.count_access(pointers, mask.data, reads=True, writes=False)
            for sequences in recording.sequences:
                axes = sequences.label(pointers, np.broadcast_to(mask.data, pointers.data.shape))
                if axes is not None:
                    value.attr[_AXES] = axes
                    break
        return value
    return create_masked_load


def _counted_store(store):
    def create_masked_store(self, pointers, value, mask, *args, **kwargs):
        if _RECORDING is not None and _RECORDING.launch is not None:
            _RECORDING.launch.count_access(pointers, mask.data, reads=False, writes=True)
        return store(self, pointers, value, mask, *args, **kwargs)
    return create_masked_store


def _counted_atomic_rmw(atomic):
    def create_atomic_rmw(self, op, pointers, value, mask, *args, **kwargs):
        if _RECORDING is not None and _RECORDING.launch is not None:
            _RECORDING.launch.count_access(pointers, mask.data, reads=True, writes=True)
        return atomic(self, op, pointers, value, mask, *args, **kwargs)
    return create_atomic_rmw


def _counted_atomic_cas(atomic):
    def create_atomic_cas(self, pointers, *args, **kwargs):
        if _RECORDING is not None and _RECORDING.launch is not None:
            _RECORDING.launch.count_access(pointers, True, reads=True, writes=True)
        return atomic(self, pointers, *args, **kwargs)
    return create_atomic_cas


def _counted_dot(dot):
    def create_dot(self, a, b, d, *args, **kwargs):
        out = dot(self, a, b, d, *args, **kwargs)
        if _RECORDING is not None and _RECORDING.launch is not None:
            _RECORDING.launch.flops.update(_product_flops(a, b, out))
        a_axes, b_axes = _axes_of(a), _axes_of(b)
        if a_axes is not None or b_axes is not None:
            out.attr[_AXES] = (*(a_axes or (None,) * a.data.ndim)[:-1], (b_axes or (None,) * b.data.ndim)[-1])
        return out
    return create_dot


def _recorded_grid(set_grid_dim):
    def recorded(self, nx, ny, nz):
        if _RECORDING is not None and _RECORDING.launch is not None:
            _RECORDING.launch.grid = (nx, ny, nz)
        return set_grid_dim(self, nx, ny, nz)
    return recorded


def _elementwise(method):
    """An op whose result has its operands' shape: each dimension keeps the first label an operand has for it."""
    def labelled(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        if isinstance(out, interpreter.TensorHandle) and _AXES not in out.attr:
            merged = None
            for arg in args:
                axes = _axes_of(arg)
                if axes is not None and arg.data.shape == out.data.shape:
                    merged = axes if merged is None else tuple(m or a for m, a in zip(merged, axes))
            if merged is not None:
                out.attr[_AXES] = merged
        return out
    return labelled


def _relabelling(relabel):
    """An op that moves dimensions: relabel(axes, out, *args) gives the result's labels from the operand's."""
    def wrap(method):
        def labelled(self, arg, *args, **kwargs):
            out = method(self, arg, *args, **kwargs)
            axes = _axes_of(arg)
            if axes is not None:
                out.attr[_AXES] = relabel(axes, arg, out, *args, *kwargs.values())
            return out
        return labelled
    return wrap


_RELABELLED = {
    "create_trans": lambda axes, arg, out, perm: tuple(axes[p] for p in perm),
    "create_expand_dims": lambda axes, arg, out, dim: (
        axes[:dim % out.data.ndim] + (None,) + axes[dim % out.data.ndim:]),
    "create_broadcast": lambda axes, arg, out, shape: tuple(
        a if before == after else None for a, before, after in zip(axes, arg.data.shape, out.data.shape)),
    "create_reshape": lambda axes, arg, out, shape, allow_reorder: (
        axes if arg.data.shape == out.data.shape else (None,) * out.data.ndim),
}
_COUNTED = {
    "create_masked_load": _counted_load, "create_masked_store": _counted_store,
    "create_atomic_rmw": _counted_atomic_rmw, "create_atomic_cas": _counted_atomic_cas, "create_dot": _counted_dot,
    "set_grid_dim": _recorded_grid,
}


def _interpreter_patches():
    builder = interpreter.InterpreterBuilder
    patches = [(builder, name, wrap(getattr(builder, name))) for name, wrap in _COUNTED.items()]
    patches += [(builder, name, _relabelling(relabel)(getattr(builder, name))) for name, relabel in _RELABELLED.items()]
    patches += [(builder, name, _elementwise(getattr(builder, name))) for name in vars(builder)
                if (name.startswith("create_") or name.endswith("_op") or name == "cast_impl")
                and callable(getattr(builder, name)) and name not in _COUNTED and name not in _RELABELLED
                and name not in ("create_load", "create_store")]
    patches.append((interpreter.GridExecutor, "__call__", _counted_launch(interpreter.GridExecutor.__call__)))
    return patches


def _counted_launch(call):
    def counted(executor, *args, **kwargs):
        recording = _RECORDING
        if recording is None:
            return call(executor, *args, **kwargs)
        signature = inspect.signature(executor.fn)
        arguments = dict(zip(signature.parameters, args))
        arguments.update((name, value) for name, value in kwargs.items() if name in signature.parameters)
        recording.launch = _LaunchCounter(executor.fn, arguments, kwargs)
        try:
            if recording.execute:
                return call(executor, *args, **kwargs)
            grid = executor.grid(arguments) if callable(executor.grid) else executor.grid
            recording.launch.grid = tuple(grid) + (1,) * (3 - len(grid))
        finally:
            recording.launches.append(recording.launch.result())
            recording.launch = None
    return counted


# --------------------------------------------------------------------------------------------------------------
# Torch-side work: every aten op run outside a launch, with the package's own operators run where this mode sees
# the ops inside them.

_ALLOCATING = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}
_OVERWRITING = {"zero_", "fill_", "copy_", "random_", "uniform_", "normal_"}  # write their first argument unread


class _TorchSide(TorchDispatchMode):
    def __init__(self, recording):
        super().__init__()
        self.recording = recording

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.recording.launch is not None:  # the interpreter copying a launch's arguments to and from its host
            return func(*args, **kwargs)
        if func.namespace == NAMESPACE:
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        out = func(*args, **kwargs)
        read, written = _torch_op_bytes(func, args, kwargs, out)
        if read or written:
            self.recording.torch_work.append(TorchWork(func.__name__.split(".")[0], read, written))
        return out


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value] if value.numel() > 0 else []
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _nbytes(tensor):
    return tensor.numel() * tensor.element_size()


def _torch_op_bytes(func, args, kwargs, out):
    """(bytes read, bytes written) of one aten op: its tensor inputs read (not those it only overwrites, nor the
    templates of *_like and new_* factories), its fresh outputs and mutated inputs written; views and
    allocations move nothing."""
    name = func._schema.name.split("::")[-1]
    if name in _ALLOCATING:
        return 0, 0
    values = dict(zip((a.name for a in func._schema.arguments), args), **kwargs)
    inputs = [(argument, t) for argument in func._schema.arguments for t in _tensors(values.get(argument.name))]
    mutated = [t for argument, t in inputs if argument.alias_info is not None and argument.alias_info.is_write]
    input_storages = {t.untyped_storage().data_ptr() for _, t in inputs}
    fresh = [t for t in _tensors(out) if t.untyped_storage().data_ptr() not in input_storages]
    if not fresh and not mutated:
        return 0, 0
    reads_inputs = not (name.endswith("_like") or name.startswith("new_"))
    overwritten = func._schema.arguments[0].name if name in _OVERWRITING else None
    read = sum(_nbytes(t) for argument, t in inputs if reads_inputs and argument.name != overwritten)
    return read, sum(_nbytes(t) for t in mutated + fresh)


# --------------------------------------------------------------------------------------------------------------
# Recording


class Recording:
    """What ran inside one `record()` block: launches (LaunchCount) and torch-side work (TorchWork)."""

    def __init__(self, execute):
        self.execute = execute
        self.launches, self.torch_work, self.sequences = [], [], []
        self.launch = None  # the _LaunchCounter of the launch running now

    def attention_operands(self, queries, keys, band, cu_seqlens=None):
        """Register an attention call's operands, so that its products' pairs are classified (see _Sequences)."""
        self.sequences.append(_Sequences(queries, keys, band, cu_seqlens))


_RECORDING = None


@contextlib.contextmanager
def record(execute=True):
    """Count every Triton launch (run by the interpreter) and every torch op inside the block. execute=False
    records each launch's kernel, grid and tile without running its programs (and so counts nothing in it)."""
    global _RECORDING
    if _RECORDING is not None:
        raise RuntimeError("record() blocks do not nest")
    recording = Recording(execute)
    with _patched(_interpreter_patches()), _TorchSide(recording):
        _RECORDING = recording
        try:
            yield recording
        finally:
            _RECORDING = None
    if execute and not recording.launches and not recording.torch_work:
        raise RuntimeError("nothing was counted: no kernel ran under Triton's interpreter (TRITON_INTERPRET=1 must "
                           "be set before triton is first imported) and no torch op ran")


# --------------------------------------------------------------------------------------------------------------
# Attention


@dataclass(frozen=True)
class AttentionCase:
    """An fp16 attention call: q (batch, heads, n, head_dim), k and v with kv_heads heads, the band (left, right)
    (causal: right = 0)."""

    batch: int
    heads: int
    n: int
    head_dim: int
    kv_heads: int = 0  # 0: as many as the query heads
    band: tuple = (-1, 0)

    @property
    def name(self):
        band = "causal" if self.band == (-1, 0) else f"window {self.band}"
        gqa = f", GQA {self.heads}/{self.kv_heads}" if self.kv_heads else ""
        return f"{band}, N {self.n}, d{self.head_dim}, B {self.batch}, H {self.heads}{gqa}"


ATTENTION_CASES = (
    AttentionCase(batch=2, heads=6, n=256, head_dim=64),  # the reference GPT's own attention
    AttentionCase(batch=1, heads=2, n=1024, head_dim=64),
    AttentionCase(batch=1, heads=2, n=1024, head_dim=128),
    AttentionCase(batch=1, heads=2, n=1024, head_dim=64, band=(255, 0)),  # each query sees itself and 255 before
    AttentionCase(batch=1, heads=6, n=1024, head_dim=64, kv_heads=2),
)


def visible_pairs(n_q, n_k, band):
    """The (query, key) pairs of one head that the band (left, right) lets a query see, bottom-right aligned."""
    relative = np.arange(n_k)[None, :] - np.arange(n_q)[:, None] - (n_k - n_q)
    left, right = band
    visible = np.ones_like(relative, dtype=bool)
    if left >= 0:
        visible &= relative >= -left
    if right >= 0:
        visible &= relative <= right
    return int(visible.sum())


def run_attention(case, seed=0):
    """The forward and backward Phases of one attention case."""
    torch.manual_seed(seed)
    dtype = torch.float16
    kv_heads = case.kv_heads or case.heads
    q = torch.randn(case.batch, case.heads, case.n, case.head_dim, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(case.batch, kv_heads, case.n, case.head_dim, dtype=dtype, requires_grad=True)
            for _ in range(2))
    grad_out = torch.randn_like(q)
    left, right = case.band
    with gpu_launch_parameters(), record() as forward:
        forward.attention_operands((q,), (k, v), case.band)
        out = kernels.attention(q, k, v, causal=right == 0, window=(left, -1 if right == 0 else right))
    with gpu_launch_parameters(), record() as backward:
        backward.attention_operands((q, out, grad_out), (k, v), case.band)
        torch.autograd.grad(out, (q, k, v), grad_out)
    lse = 4 * case.batch * case.heads * case.n  # one fp32 per query row
    qkv = _nbytes(q) + _nbytes(k) + _nbytes(v)
    pair_flops = 2 * case.head_dim * case.batch * case.heads * visible_pairs(case.n, case.n, case.band)
    return [
        Phase("attention forward", case.name, qkv + _nbytes(out) + lse, forward.launches, forward.torch_work,
              pair_flops, minimum_products=2),
        Phase("attention backward", case.name, _nbytes(grad_out) + 2 * qkv + _nbytes(out) + lse, backward.launches,
              backward.torch_work, pair_flops, minimum_products=5),
    ]


# --------------------------------------------------------------------------------------------------------------
# LayerNorm and add + LayerNorm

NORM_OPS = ("layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm")
NORM_WIDTHS = (384, 1024, 4096, 16384, 65536)
NORM_ROWS = (4096, 65536)  # the table's rows, and the bandwidth-bound shape bench.layernorm measures
# The LayerNorm samples: rows r0 and 2 * r0 on s0 and 2 * s0 multiprocessors, for the first r0 and then the first
# s0 at which every phase's grid differs between the samples (so that per-row and per-program counts separate).
SAMPLE_ROWS = (8, 16, 32, 64, 128, 256, 512, 1024)
SAMPLE_MULTIPROCESSORS = (1, 2, 4, 8, 16, 32, 64)


def run_norm(op, width, rows, multiprocessors=MULTIPROCESSORS, execute=True, seed=0, min_backward_rows=None):
    """The forward and backward Phases of `op` (one of NORM_OPS; RMSNorm without a bias) on (rows, width) fp16
    inputs, run directly. execute=False records the launches without running their programs (and leaves the inputs
    unwritten, so no memory is touched by them). min_backward_rows: as in gpu_launch_parameters."""
    torch.manual_seed(seed)
    dtype = torch.float16
    make = torch.randn if execute else torch.empty
    with_sum, rms = op.startswith("add_"), "rms" in op
    x = make(rows, width, dtype=dtype).requires_grad_()
    residual = make(rows, width, dtype=dtype).requires_grad_() if with_sum else None
    weight = make(width, dtype=dtype).requires_grad_()
    bias = None if rms else make(width, dtype=dtype).requires_grad_()
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    launch_parameters = dict(multiprocessors=multiprocessors, min_backward_rows=min_backward_rows)
    with gpu_launch_parameters(**launch_parameters), record(execute) as forward:
        norm = getattr(kernels, op)
        outputs = norm(*inputs) if with_sum else (norm(*inputs),)
    grads = [make(rows, width, dtype=dtype) for _ in outputs]
    with gpu_launch_parameters(**launch_parameters), record(execute) as backward:
        torch.autograd.grad(outputs, inputs, grads)
    statistics = (1 if rms else 2) * 4 * rows  # the fp32 mean (LayerNorm's) and 1 / std of each row
    parameters = 1 if rms else 2  # weight (and bias)
    rows_bytes, vector = _nbytes(x), _nbytes(weight)
    streams = 2 if with_sum else 1  # x and residual in, y and s out; dy and ds in
    case = f"{rows} x {width}"
    return [
        Phase(f"{op} forward", case, 2 * streams * rows_bytes + parameters * vector + statistics, forward.launches,
              forward.torch_work),
        # dy (and ds) and the normalized rows in, dx out (the same tensor is the residual's gradient); the weight
        # in, its gradient (and the bias's) out
        Phase(f"{op} backward", case, (streams + 2) * rows_bytes + (1 + parameters) * vector + statistics,
              backward.launches, backward.torch_work),
    ]


def _norm_at_scale(op, width, targets, multiprocessors=MULTIPROCESSORS):
    """The Phases of `op` at each number of rows in `targets` on `multiprocessors` SMs, extrapolated from small
    samples: see the module docstring."""
    dry_targets = {rows: run_norm(op, width, rows, multiprocessors, execute=False) for rows in targets}
    for r0, s0 in _sample_points(op, width):
        corners = [run_norm(op, width, r, s, min_backward_rows=1) for r in (r0, 2 * r0) for s in (s0, 2 * s0)]
        phases = []
        for rows in targets:
            extrapolated = [_affine(corner_phases, target, r0, rows)
                            for *corner_phases, target in zip(*corners, dry_targets[rows])]
            if None in extrapolated:
                break
            phases += extrapolated
        else:
            return phases
    raise RuntimeError(f"{op} at width {width}: counts not affine in rows and programs at any of the sample "
                       f"rows {SAMPLE_ROWS}; count it directly (run_norm) instead")


def _sample_points(op, width):
    """(r0, s0) for each r0 of SAMPLE_ROWS: the first s0 of SAMPLE_MULTIPROCESSORS at which every phase's programs
    (_programs) differ between s0 and 2 * s0 SMs at r0 or at 2 * r0 rows (found by dry runs, which cost nothing).
    The samples let a backward program take a single row: only the target's grid must be the launcher's own."""
    for r0 in SAMPLE_ROWS:
        for s0 in SAMPLE_MULTIPROCESSORS:
            programs = [[_programs(phase) for phase in run_norm(op, width, r, s, execute=False,
                                                                 min_backward_rows=1)]
                        for r in (r0, 2 * r0) for s in (s0, 2 * s0)]
            if all(p00 != p01 or p10 != p11 for p00, p01, p10, p11 in zip(*programs)):
                yield r0, s0
                break


def _programs(phase):
    """The programs of a phase's first launch: the coordinate its counts are affine in, besides the rows (each
    program's run of rows costs per row, and each program its own weight loads and partial-sum stores)."""
    return int(np.prod(phase.launches[0].grid))


def _affine(corners, target, r0, rows):
    """The target Phase with each launch's counts extrapolated from the corner samples (r0 rows on s0 and 2 s0
    SMs, 2 r0 rows on both) to (rows, the target's programs): each count fitted as a + b * rows + c * programs,
    or None where a count is not affine there or a grid is not what the target launched."""
    if any(len(c.launches) != len(target.launches) for c in corners):
        return None
    points = [(r, _programs(c)) for r, c in zip((r0, r0, 2 * r0, 2 * r0), corners)]
    at = (rows, _programs(target))
    launches = []
    for index, launch in enumerate(target.launches):
        corner_launches = [c.launches[index] for c in corners]
        if any(c.kernel != launch.kernel for c in corner_launches):
            return None

        def at_target(values):
            return _plane_value(points, values, at)

        try:
            grid = tuple(at_target([c.grid[axis] for c in corner_launches]) for axis in range(3))
            names = set().union(*(c.operands for c in corner_launches))
            operands = {name: {key: at_target([c.operands.get(name, {}).get(key, 0) for c in corner_launches])
                               for key in ("loaded", "stored", "read", "written")} for name in sorted(names)}
            flops = Counter({bucket: at_target([c.flops[bucket] for c in corner_launches])
                             for bucket in set().union(*(c.flops for c in corner_launches))})
        except _NotAffine:
            return None
        if grid != launch.grid:
            return None
        launches.append(LaunchCount(launch.kernel, launch.grid, launch.tile, operands, flops))
    return Phase(target.op, target.case, target.needed, launches, target.torch_work, sample_rows=r0)


def _plane_value(points, values, at):
    """The value at `at` of the plane v = a + b x + c y through the four (x, y) points and their values, exactly;
    _NotAffine where no plane passes through all four, or its value there is no integer."""
    for i, j, k in ((0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)):
        (x0, y0), (x1, y1), (x2, y2) = points[i], points[j], points[k]
        determinant = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if determinant:
            break
    else:
        raise _NotAffine
    v0, v1, v2 = values[i], values[j], values[k]
    b = Fraction((v1 - v0) * (y2 - y0) - (v2 - v0) * (y1 - y0), determinant)
    c = Fraction((x1 - x0) * (v2 - v0) - (x2 - x0) * (v1 - v0), determinant)

    def plane(x, y):
        return v0 + b * (x - x0) + c * (y - y0)

    if any(plane(x, y) != v for (x, y), v in zip(points, values)):
        raise _NotAffine
    value = plane(*at)
    if value.denominator != 1:
        raise _NotAffine
    return int(value)


class _NotAffine(Exception):
    pass


# --------------------------------------------------------------------------------------------------------------
# Tables


def _ratio(value, needed):
    return f"{value / needed:.2f}"


def attention_table(phases):
    lines = ["| case | pass | launches | bytes moved / needed | distinct / needed | products per visible pair "
             "(minimum) | on visible pairs | on masked pairs | on padding | unclassified |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in phases:
        lines.append(f"| {p.case} | {p.op.split()[-1]} | {len(p.launches)} | {_ratio(p.moved, p.needed)} | "
                     f"{_ratio(p.distinct, p.needed)} | {p.products():.2f} ({p.minimum_products}) | "
                     + " | ".join(f"{p.products(bucket):.2f}" for bucket in ("visible", "masked", "padding",
                                                                            "unclassified")) + " |")
    return "\n".join(lines)


def norm_table(phases):
    lines = ["| op | rows x width | pass | launches | bytes moved / needed | of which torch-side | "
             "distinct / needed |", "|---|---|---|---|---|---|---|"]
    for p in phases:
        op, direction = p.op.split()
        lines.append(f"| {op} | {p.case} | {direction} | {len(p.launches)} | "
                     f"{_ratio(p.moved, p.needed)} | {_ratio(p.torch_bytes, p.needed)} | "
                     f"{_ratio(p.distinct, p.needed)} |")
    return "\n".join(lines)


def launch_table(phases):
    """One row per launch and one per pass's torch-side work, each as ratios to its pass's needed bytes."""
    lines = ["| op | case | kernel | grid | tile | bytes moved / needed | distinct / needed | products per visible "
             "pair | by operand: moved (distinct) / needed |", "|---|---|---|---|---|---|---|---|---|"]
    for p in phases:
        for launch in p.launches:
            grid = " x ".join(str(g) for g in launch.grid if g > 1) or "1"
            products = f"{sum(launch.flops.values()) / p.pair_flops:.2f}" if p.pair_flops else ""
            operands = ", ".join(
                f"{name} {_ratio(o['loaded'] + o['stored'], p.needed)} ({_ratio(o['read'] + o['written'], p.needed)})"
                for name, o in sorted(launch.operands.items(), key=lambda item: (-sum(item[1].values()), item[0])))
            lines.append(f"| {p.op} | {p.case} | {launch.kernel} | {grid} | {launch.tile} | "
                         f"{_ratio(launch.moved, p.needed)} | {_ratio(launch.distinct, p.needed)} | {products} | "
                         f"{operands} |")
        if p.torch_work:
            ops = Counter(w.op for w in p.torch_work)
            names = ", ".join(f"{op} x{count}" if count > 1 else op for op, count in ops.items())
            lines.append(f"| {p.op} | {p.case} | torch: {names} | | | {_ratio(p.torch_bytes, p.needed)} | "
                         f"{_ratio(p.torch_bytes, p.needed)} | | |")
    return "\n".join(lines)


HEADER = """# Work counts at an sm_90 card's launch parameters

Made on CPU by `python -m bench.workcount --markdown bench/results/workcount.md`: the kernels run under Triton's
interpreter with the tiles and program counts an H100/H200 launch (sm_90, 132 SMs), fp16. Every load, store and
matrix product of every launch is counted, and the torch-side work between launches. Ratios are to what the op
needs: each input read once and each output written once (see bench/workcount.py for each op's list).

- **bytes moved**: mask-true elements loaded and stored, plus the torch-side ops' reads and writes;
- **distinct**: per launch, the bytes read at least once plus the bytes written at least once (DRAM traffic if
  every launch cached perfectly), plus the torch-side bytes;
- **products per visible pair**: matrix-product FLOPs / (2 x head size x visible (query, key) pairs); the minimum
  is 2 forward, 5 backward. Split by the pairs the products were spent on: visible, masked out by the band
  (e.g. the far side of the diagonal in blocks computed whole), padding (a query or key past its sequence's end).
"""


def markdown(attention, norms):
    parts = [HEADER]
    if attention:
        parts += ["## Attention\n", attention_table(attention), ""]
    if norms:
        samples = sorted({p.sample_rows for p in norms if p.sample_rows})
        parts += ["## LayerNorm\n", norm_table(norms), ""]
        if samples:
            parts += [textwrap.fill(
                f"The launches' counts are extrapolated from runs at r and 2r rows on s and 2s SMs (r = "
                f"{', '.join(map(str, samples))} rows, the fewest at which every count is exactly affine in rows and "
                "the programs of the pass's grid), and the target's own launches have the grids the extrapolation "
                "predicts (see bench/workcount.py). The torch-side work is counted at the target itself.", 116)
                + "\n"]
    parts += ["## Per launch\n", launch_table(attention + norms), ""]
    return "\n".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", action="append", choices=("attention",) + NORM_OPS,
                        help="ops to count (repeatable; default all)")
    parser.add_argument("--widths", type=int, nargs="+", default=NORM_WIDTHS, help="LayerNorm row widths")
    parser.add_argument("--rows", type=int, nargs="+", default=NORM_ROWS, help="LayerNorm rows")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args(argv)
    chosen = args.op or ["attention", *NORM_OPS]
    attention, norms = [], []
    for case in ATTENTION_CASES if "attention" in chosen else ():
        started = time.perf_counter()
        attention += run_attention(case)
        print(f"attention {case.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    for op in NORM_OPS:
        for width in args.widths if op in chosen else ():
            started = time.perf_counter()
            # the kernels' 32-bit offsets bound a tensor's elements
            norms += _norm_at_scale(op, width, [rows for rows in args.rows if rows * width < norm_tiles.MAX_ELEMENTS])
            print(f"{op} {width}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    text = markdown(attention, norms)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
