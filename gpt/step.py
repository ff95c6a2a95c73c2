"""The training step gpt-train runs and bench.train times, and the settings it runs under.

Settings (resolve_settings): each choice a flag leaves open is made by the device, and the reason is kept for the log.
- Attention and LayerNorm: this package's Triton kernels on a CUDA GPU. On a CPU the eager modules, since Triton
  runs there only through its interpreter.
- Precision: bf16 autocast on a GPU with bf16, else fp16 autocast with a GradScaler; fp32 on a CPU. Autocast runs
  the matrix products in the low precision and leaves the weights, their gradients and AdamW's state in fp32, so a
  checkpoint is the same whatever precision wrote it.
- AdamW's fused implementation, and TF32 for the fp32 matrix products that remain: on CUDA.
- torch.compile and CUDA graphs: off, unless bench.train measured them fastest on this card (FASTEST_ON_CARD).

The step (TrainStep): zero the gradients, forward under autocast, backward, AdamW.
- With compile, the model runs under torch.compile(fullgraph=True). Our operators are opaque nodes in its graph,
  and Inductor fuses the work around them.
- With CUDA graphs, the whole step (forward, backward and AdamW) is captured once after a few warm-up steps, then
  replayed for every batch: one launch instead of hundreds, so a small model's step stops waiting on the host.
  Every replay draws fresh dropout masks: torch's dropout and our attention's seed (attention_dropout_seed) draw
  on the device from torch's generator, whose offset advances at each replay.
"""

import contextlib
from dataclasses import dataclass, field

import torch

from gpt.cli import resolve_backends

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# What bench.train measured fastest at the reference config, per card (the name torch.cuda.get_device_name gives):
# {"NVIDIA H200": dict(compile=False, cuda_graphs=True)} would make CUDA graphs the default there. A card not listed
# trains in eager mode until bench.train has measured it.
FASTEST_ON_CARD: dict[str, dict] = {}

# Eager steps before a CUDA graph is captured: lazy initialisation (cuBLAS handles, Triton's compiles, AdamW's
# state, the allocator's blocks) must happen outside the capture. DistributedDataParallel needs 11 (PyTorch's CUDA
# semantics notes, "Usage with DistributedDataParallel").
GRAPH_WARMUP_STEPS = 3
DDP_GRAPH_WARMUP_STEPS = 11


class SettingsError(ValueError):
    """A combination of training settings that cannot run; the message names the flags."""


@dataclass(frozen=True)
class TrainSettings:
    """How the step runs. `reasons` says why each choice was made (the flag, or the device's default)."""

    attention: str
    layernorm: str
    dtype: str  # a key of DTYPES: "float32" runs without autocast; "float16" adds a GradScaler
    compile: bool
    cuda_graphs: bool
    fused_adamw: bool
    tf32: bool
    reasons: dict = field(default_factory=dict, compare=False)

    def autocast(self, device_type: str):
        """The autocast context of the forward. Its cache of weights cast to the low precision is off: every
        weight is used once per forward, so the cache saves nothing, and a CUDA graph cannot hold it."""
        return torch.autocast(device_type, dtype=DTYPES[self.dtype], enabled=self.dtype != "float32",
                              cache_enabled=False)

    def describe(self) -> list[str]:
        """gpt-train's log lines for these settings, each with its reason."""
        precision = {"float32": "float32", "bfloat16": "bfloat16 autocast, weights and optimizer state in float32",
                     "float16": "float16 autocast and a GradScaler, weights and optimizer state in float32"}
        r = self.reasons
        compile, graphs = f"compile {_on(self.compile)}", f"CUDA graphs {_on(self.cuda_graphs)}"
        if r["compile"] == r["cuda_graphs"]:
            step = f"{compile}, {graphs} ({r['compile']})"
        else:
            step = f"{compile} ({r['compile']}), {graphs} ({r['cuda_graphs']})"
        return [
            f"backends: attention={self.attention}, layernorm={self.layernorm} ({r['backends']})",
            f"precision: {precision[self.dtype]} ({r['dtype']})",
            f"optimizer: AdamW, {'fused' if self.fused_adamw else 'not fused'}; TF32 matmuls {_on(self.tf32)} "
            f"({r['optimizer']})",
            f"step: {step}",
        ]


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def resolve_settings(device, attention=None, layernorm=None, dtype=None, compile=None, cuda_graphs=None,
                     log_fallback=None) -> TrainSettings:
    """The settings for training on `device`: each argument given (not None) as given, the rest by the device.
    Raises SettingsError for a combination that cannot run. `log_fallback` receives the message when Triton
    backends were asked for on a CPU and eager ones are used instead."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if cuda_graphs and not on_gpu:
        raise SettingsError(f"--cuda-graphs needs a CUDA GPU (this run is on {device})")
    if cuda_graphs and dtype == "float16":
        raise SettingsError("--cuda-graphs cannot run with --dtype float16: the GradScaler reads its overflow check "
                            "back to the host, which a CUDA graph cannot hold; use bfloat16 or float32")
    reasons = {}
    attention, layernorm, reasons["backends"] = _backends(device, attention, layernorm, log_fallback)
    modes = _step_modes(device, compile, cuda_graphs, reasons)
    if dtype is not None:
        reasons["dtype"] = "as requested"
    elif not on_gpu:
        dtype, reasons["dtype"] = "float32", "the default on a CPU"
    elif torch.cuda.is_bf16_supported(including_emulation=False):
        dtype, reasons["dtype"] = "bfloat16", "the default on a GPU with bf16"
    elif cuda_graphs:
        dtype, reasons["dtype"] = "float32", "this GPU has no bf16, and fp16's GradScaler cannot be in a CUDA graph"
    else:
        dtype, reasons["dtype"] = "float16", "this GPU has no bf16"
    if dtype == "float16" and modes["cuda_graphs"]:  # a measured default that cannot run here: off, and said so
        modes["cuda_graphs"], reasons["cuda_graphs"] = False, "fp16's GradScaler cannot be in a CUDA graph"
    reasons["optimizer"] = "the default on CUDA" if on_gpu else "fused AdamW and TF32 are used on CUDA only"
    return TrainSettings(attention, layernorm, dtype, modes["compile"], modes["cuda_graphs"], fused_adamw=on_gpu,
                         tf32=on_gpu, reasons=reasons)


def _backends(device, attention, layernorm, log_fallback):
    """(attention, layernorm, why): Triton on a GPU, eager on a CPU, unless asked otherwise."""
    on_gpu = device.type == "cuda"
    default = "triton" if on_gpu else "eager"
    default_why = ("this package's kernels, the default on a CUDA GPU" if on_gpu else
                   "the reference modules, the default on a CPU, where Triton runs only interpreted")
    requested = [f"--{name}" for name, value in (("attention", attention), ("layernorm", layernorm)) if value]
    why = ("as requested" if len(requested) == 2 else
           f"{requested[0]} as requested, the other {default_why}" if requested else default_why)
    fallback = []
    attention, layernorm = resolve_backends(attention or default, layernorm or default, device, log=fallback.append)
    if fallback:
        why = "Triton needs a CUDA GPU; eager instead"
        if log_fallback is not None:
            log_fallback(fallback[0])
    return attention, layernorm, why


def _step_modes(device, compile, cuda_graphs, reasons) -> dict:
    """{"compile": bool, "cuda_graphs": bool}: as asked, else what bench.train measured fastest on this card (off
    on a card it has not measured, and on a CPU). Records the reasons."""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    measured = FASTEST_ON_CARD.get(card)
    if measured is not None:
        default_why = f"bench.train measured this fastest on the {card}"
    elif card is not None:
        default_why = f"not yet measured faster on the {card} by bench.train"
    else:
        default_why = "the default on a CPU"
    modes = {}
    for name, value in (("compile", compile), ("cuda_graphs", cuda_graphs)):
        modes[name] = value if value is not None else bool(measured and measured[name])
        reasons[name] = "as requested" if value is not None else default_why
    return modes


def make_optimizer(model, lr: float, settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW over the model's parameters; fused where the settings say, and capturable in a CUDA graph."""
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=settings.fused_adamw,
                             capturable=settings.cuda_graphs)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """AdamW's moments and step counts from a checkpoint, with this run's options (learning rate, fused,
    capturable, ...) rather than the saved ones: a checkpoint a CUDA-graph run wrote (capturable) resumes on a CPU,
    and one from a CPU resumes fused on a GPU, its step counts moved where the fused kernel reads them."""
    own = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    groups = [{**saved, **options} for saved, options in zip(state["param_groups"], own, strict=True)]
    optimizer.load_state_dict({**state, "param_groups": groups})


class TrainStep:
    """One optimizer step on a batch: `step(x, y)` returns this rank's loss, detached and not read back.

    model: the GPT; optimizer: from make_optimizer; wrap: what wraps the (compiled) model, if anything
    (DistributedDataParallel under torchrun). `warming_up` is true while the last call was a warm-up step
    (compilation, the first launches of each kernel, CUDA-graph capture), which a speed measurement leaves out."""

    def __init__(self, model, optimizer, settings: TrainSettings, device, wrap=None):
        self.model, self.optimizer, self.settings = model, optimizer, settings
        self.device = torch.device(device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.dtype == "float16")
        if settings.tf32:  # process-wide: the fp32 matrix products (the whole step under --dtype float32) use TF32
            torch.set_float32_matmul_precision("high")
        self.calls = 0
        self.graph = None
        self.stream = None
        self.distributed = wrap is not None
        # The model is compiled inside DDP's wrapper, not around it: Dynamo cannot trace DDP's forward whole. DDP
        # must be built on the stream the graph is captured on.
        trained = torch.compile(model, fullgraph=True) if settings.compile else model
        with self._side_stream() if settings.cuda_graphs else contextlib.nullcontext():
            self.trained = wrap(trained) if wrap is not None else trained
        graph_warmup = DDP_GRAPH_WARMUP_STEPS if self.distributed else GRAPH_WARMUP_STEPS
        # warm-up calls: the first (compilation, first launches); with CUDA graphs the eager ones and the capture
        self.warmup_calls = graph_warmup + 1 if settings.cuda_graphs else 1

    @property
    def warming_up(self) -> bool:
        return self.calls <= self.warmup_calls

    def __call__(self, x, y) -> torch.Tensor:
        self.calls += 1
        if not self.settings.cuda_graphs:
            self.optimizer.zero_grad(set_to_none=True)
            return self._update(x, y)
        if self.graph is None and self.calls < self.warmup_calls:
            with self._side_stream():  # warm-up steps run beside the capture stream, as PyTorch requires
                self.optimizer.zero_grad(set_to_none=True)
                return self._update(x, y)
        if self.graph is None:
            self.static_x, self.static_y = x.clone(), y.clone()
            self.graph = self._capture()
        else:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
        self.graph.replay()  # also after capturing, which records the step without running it
        return self.static_loss.clone()  # the next replay overwrites static_loss

    def _update(self, x, y) -> torch.Tensor:
        """Forward, backward and the optimizer step (the gradients are zero or None before it)."""
        with self.settings.autocast(self.device.type):
            _, loss = self.trained(x, y)
        self.scaler.scale(loss).backward()  # the scaler does nothing unless fp16
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def _capture(self):
        """Record one step on (static_x, static_y) as a CUDA graph; recording runs nothing."""
        self.optimizer.zero_grad(set_to_none=True)  # backward then allocates the gradients in the graph's memory,
        graph = torch.cuda.CUDAGraph()  # and each replay writes them afresh instead of adding to them
        with torch.cuda.graph(graph, stream=self._stream()):
            self.static_loss = self._update(self.static_x, self.static_y)
        return graph

    def _stream(self):
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        return self.stream

    @contextlib.contextmanager
    def _side_stream(self):
        """Run the block on the capture stream, ordered after and before the current stream's work."""
        stream = self._stream()
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(stream)
