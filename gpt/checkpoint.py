"""The checkpoint gpt-train writes and gpt-sample reads.

A checkpoint is one `torch.save`d dict: "config" (the GPTConfig as a dict), "model" (the state dict), "optimizer"
(AdamW's state), "step", "vocab" (the tokenizer's characters), "args" (the run's arguments) and "losses"; and
"scaler", the fp16 GradScaler's state (empty for other precisions; absent from older checkpoints). The weights and
AdamW's state are float32 whatever the backends and the autocast precision, so a checkpoint resumes or samples
under any of them.
"""

import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_NAME = "ckpt.pt"
CHECKPOINT_KEYS = ("config", "model", "optimizer", "step", "vocab", "args", "losses")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


class CheckpointError(ValueError):
    """A file that is not a gpt-train checkpoint, or one that is damaged."""


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
    with open(path, "rb") as f:
        if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            raise CheckpointError(f"{path} is not a checkpoint (not an archive written by torch.save)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # whatever torch.load trips on inside the archive, the file is not what it was
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is a damaged checkpoint ({reason})") from e
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a gpt-train checkpoint (no {', '.join(missing)})")
    return checkpoint
