"""Text in, token batches out: a character-level tokenizer, the default corpus, and train/val batches.

The default corpus is the Python standard library's own top-level `.py` sources, read in sorted order and
capped, so every machine with Python has it and the default model learns to write Python-looking text.
"""

import sysconfig
from pathlib import Path

import torch

DEFAULT_CORPUS_MAX_CHARS = 2_000_000
VAL_FRACTION = 0.1


class CharTokenizer:
    """Maps each character of a fixed vocabulary to its index in the sorted vocabulary, and back."""

    def __init__(self, chars):
        chars = list(chars)
        if not chars:
            raise ValueError("a tokenizer needs at least one character in its vocabulary")
        if len(set(chars)) != len(chars) or any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("the vocabulary must be a list of distinct single characters")
        self.chars = chars  # saved with the checkpoint: the tokenizer is rebuilt from it
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            shown = "".join(unknown[:20])
            raise ValueError(f"{len(unknown)} character(s) not in the vocabulary: {shown!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= i < len(self.chars)]
        if bad:
            raise ValueError(f"token id(s) {bad[:10]} outside the vocabulary [0, {len(self.chars)})")
        return "".join(self.chars[i] for i in ids)


def default_corpus(max_chars: int = DEFAULT_CORPUS_MAX_CHARS) -> str:
    """The standard library's top-level `.py` files in sorted order, concatenated and cut at `max_chars`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text[: max_chars - total])
        total += len(parts[-1])
        if total >= max_chars:
            break
    if total == 0:
        raise FileNotFoundError(f"no Python sources found in the standard library at {stdlib}")
    return "".join(parts)


def load_text(path=None) -> str:
    """The text of a UTF-8 file, or the default corpus when `path` is None."""
    if path is None:
        return default_corpus()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path} is not UTF-8 text: {e}") from None
    if not text:
        raise ValueError(f"data file {path} is empty")
    return text


class TextDataset:
    """A text encoded once, split 90/10 into train and validation, served as random (x, y) batches
    where y is x shifted one character ahead."""

    def __init__(self, text: str, block_size: int, tokenizer: CharTokenizer | None = None):
        if not text:
            raise ValueError("cannot build a dataset from empty text")
        self.tokenizer = tokenizer or CharTokenizer.from_text(text)
        self.block_size = block_size
        data = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        n_train = int((1 - VAL_FRACTION) * len(data))
        self.splits = {"train": data[:n_train], "val": data[n_train:]}
        for split, tokens in self.splits.items():
            if len(tokens) <= block_size:
                raise ValueError(
                    f"the {split} split has {len(tokens)} characters, too few for block_size {block_size}: "
                    f"use a longer text (at least ~{(block_size + 1) * 10 + 1} characters) or a smaller block_size"
                )

    def get_batch(self, split: str, batch_size: int, device="cpu", generator: torch.Generator | None = None):
        """x, y of shape (batch_size, block_size): random windows of the split and the same windows one ahead."""
        if split not in self.splits:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        data = self.splits[split]
        starts = torch.randint(len(data) - self.block_size, (batch_size,), generator=generator)
        x = torch.stack([data[i : i + self.block_size] for i in starts])
        y = torch.stack([data[i + 1 : i + 1 + self.block_size] for i in starts])
        return x.to(device), y.to(device)
