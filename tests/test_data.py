"""Tokenizer, default corpus, text loading, the 90/10 split and batches."""

import pytest
import torch

from gpt.data import DEFAULT_CORPUS_MAX_CHARS, CharTokenizer, TextDataset, default_corpus, load_text


def test_tokenizer_round_trip():
    text = "def f(x):\n\treturn x ** 2  # é, ü, ∑\n"
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.chars == sorted(set(text)) and tokenizer.vocab_size == len(set(text))
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(torch.tensor(ids)) == text


def test_tokenizer_rebuilt_from_its_saved_vocabulary():
    tokenizer = CharTokenizer.from_text("hello world")
    rebuilt = CharTokenizer(list(tokenizer.chars))
    assert rebuilt.encode("low") == tokenizer.encode("low")


def test_tokenizer_bad_input():
    tokenizer = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="not in the vocabulary: 'xz'"):
        tokenizer.encode("abxz")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([0, 3])
    with pytest.raises(ValueError, match="at least one character"):
        CharTokenizer([])
    with pytest.raises(ValueError, match="distinct single characters"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="distinct single characters"):
        CharTokenizer(["ab"])


def test_default_corpus_exists_is_deterministic_and_capped():
    text = default_corpus()
    assert len(text) == DEFAULT_CORPUS_MAX_CHARS  # the standard library holds far more than the cap
    assert text == default_corpus()
    assert "def " in text and "import " in text
    assert default_corpus(max_chars=1000) == text[:1000]


def test_load_text_from_a_file(tmp_path):
    path = tmp_path / "shakespeare.txt"
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n", encoding="utf-8")
    assert load_text(path) == path.read_text(encoding="utf-8")
    assert load_text(None) == default_corpus()


def test_load_text_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text(tmp_path / "latin1.txt")


def test_split_is_90_10_in_order():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    dataset = TextDataset(text, block_size=8)
    train, val = dataset.splits["train"], dataset.splits["val"]
    assert len(train) == 900 and len(val) == 100
    assert dataset.tokenizer.decode(torch.cat([train, val])) == text


@pytest.mark.parametrize("split", ["train", "val"])
def test_batches_are_windows_shifted_by_one(device, split):
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(2000))
    dataset = TextDataset(text, block_size=16)
    x, y = dataset.get_batch(split, batch_size=5, device=device, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 16) and x.dtype == y.dtype == torch.long
    assert x.device.type == y.device.type == torch.device(device).type
    assert torch.equal(x[:, 1:], y[:, :-1])
    data = dataset.splits[split].tolist()
    joined = "".join(map(chr, data))
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        window = row_x + row_y[-1:]
        assert "".join(map(chr, window)) in joined


@pytest.mark.parametrize("split", ["train", "val"])
def test_every_window_of_a_split_can_be_drawn(split):
    """Over many batches the windows start at every valid position, from the split's first character to
    the last start that still leaves room for the shifted targets, and nowhere else."""
    text = "".join(chr(0x100 + i) for i in range(200))  # distinct characters: a window's first id is its start
    dataset = TextDataset(text, block_size=5)
    first_id = 0 if split == "train" else len(dataset.splits["train"])
    generator = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(100):
        x, _ = dataset.get_batch(split, batch_size=64, generator=generator)
        starts.update((x[:, 0] - first_id).tolist())
    assert starts == set(range(len(dataset.splits[split]) - dataset.block_size))


def test_batches_follow_the_generator():
    dataset = TextDataset("abcdefghij" * 50, block_size=4)
    first = dataset.get_batch("train", 3, generator=torch.Generator().manual_seed(1))
    again = dataset.get_batch("train", 3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_dataset_bad_input():
    with pytest.raises(ValueError, match="empty"):
        TextDataset("", block_size=4)
    with pytest.raises(ValueError, match="too few for block_size"):
        TextDataset("abcdefghij" * 5, block_size=8)  # the val split holds 5 characters
    with pytest.raises(ValueError, match="not in the vocabulary"):
        TextDataset("abc" * 100, block_size=4, tokenizer=CharTokenizer("ab"))
    dataset = TextDataset("abc" * 100, block_size=4)
    with pytest.raises(ValueError, match="split must be"):
        dataset.get_batch("test", 2)
