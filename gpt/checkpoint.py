"""The checkpoint gpt-train writes and gpt-sample reads, and the backends a model is rebuilt with.

A checkpoint is one `torch.save`d dict: "config" (the GPTConfig as a dict), "model" (the state dict), "optimizer"
(AdamW's state), "step", "vocab" (the tokenizer's characters), "args" (the run's arguments) and "losses".
"""

import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_NAME = "ckpt.pt"


def save_checkpoint(checkpoint: dict, path) -> None:
    """Write to a temporary file in the same directory, then rename over `path`: a crash at any moment
    leaves either the old checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path, device="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with gpt-train first")
    return torch.load(path, map_location=device, weights_only=True)


def resolve_backends(attention: str, layernorm: str, device, log=print) -> tuple[str, str]:
    """The backends to build the model with on `device`: Triton only trains on a GPU."""
    if torch.device(device).type != "cuda" and "triton" in (attention, layernorm):
        log(
            "Triton backends need a CUDA GPU: without one only Triton's CPU interpreter can run them, "
            "far too slowly to train. Using eager attention and layernorm."
        )
        return "eager", "eager"
    return attention, layernorm
