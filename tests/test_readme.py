"""README.md as a newcomer uses it: every python block defines what it uses and runs as printed (blocks written
for a GPU, where there is one), and every command it prints runs from a fresh clone after `make`."""

import ast
import builtins
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.cli import DEFAULT_CPU_THREADS
from gpt.train import parse_args, train

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def readme_blocks(language):
    """{"<heading> #<n>": code} for the README's ```<language> blocks, named after the heading above them."""
    blocks, heading, count = {}, None, {}
    for match in re.finditer(rf"^#+ ([^\n]*)$|^```{language}\n(.*?)^```", README, re.MULTILINE | re.DOTALL):
        if match[1] is not None:
            heading = match[1].replace("`", "")
            continue
        count[heading] = count.get(heading, 0) + 1
        blocks[f"{heading} #{count[heading]}"] = match[2]
    return blocks


PYTHON_BLOCKS = readme_blocks("python")
BASH_BLOCKS = readme_blocks("bash")


def written_for_a_gpu(code):
    return "cuda" in code


def undefined_names(code):
    """Names a block reads but neither defines, imports nor gets from builtins."""
    tree = ast.parse(code)
    defined = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return used - defined


@pytest.mark.parametrize("block", PYTHON_BLOCKS)
def test_python_block_defines_what_it_uses(block):
    assert not undefined_names(PYTHON_BLOCKS[block]), f"{block} uses names it never defines"


@pytest.fixture(scope="module")
def reader_folder(tmp_path_factory):
    """A folder like a clone after `make train`: out/ckpt.pt is a gpt-train checkpoint (a tiny one)."""
    folder = tmp_path_factory.mktemp("reader")
    data = folder / "input.txt"
    data.write_text("the quick brown fox jumps over the lazy dog.\n" * 40, encoding="utf-8")
    train(parse_args(["--data", str(data), "--out-dir", str(folder / "out"), "--device", "cpu", "--n-embd", "16",
                      "--n-head", "2", "--n-layer", "1", "--block-size", "16", "--batch-size", "4",
                      "--max-iters", "1", "--eval-iters", "1", "--sample-tokens", "1"]))  # fmt: skip
    return folder


@pytest.mark.parametrize("block", PYTHON_BLOCKS)
def test_python_block_runs_as_printed(block, reader_folder, monkeypatch):
    code = PYTHON_BLOCKS[block]
    if written_for_a_gpu(code) and not torch.cuda.is_available():
        pytest.skip("written for a GPU: at its shapes Triton's interpreter would take minutes (and computes bf16 "
                    "wrongly, issue 10), and torch.compile's Inductor cannot run the interpreted kernels")
    monkeypatch.chdir(reader_folder)
    if "TRITON_INTERPRET" in code:  # it shows how to set it up: in a fresh interpreter, as a reader runs it
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
    else:  # with the threads gpt-train and gpt-sample use on a CPU (torch's default can be 10x slower: README, Threads)
        threads = torch.get_num_threads()
        torch.set_num_threads(DEFAULT_CPU_THREADS)
        try:
            exec(compile(code, f"README.md, {block}", "exec"), {})
        finally:
            torch.set_num_threads(threads)


def printed_commands():
    """Every command the README prints: the lines of its bash blocks and the first column of its tables."""
    lines = [line.split("  #")[0].strip() for code in BASH_BLOCKS.values() for line in code.splitlines()]
    table_commands = re.findall(r"^\| `([^`]+)` \|", README, re.MULTILINE)
    return [line for line in lines + table_commands if line]


@pytest.mark.parametrize("command", printed_commands())
def test_printed_command_runs_from_a_fresh_clone(command):
    """`make` builds .venv, and nothing is on PATH or installed elsewhere: Python tools run from .venv/bin."""
    program, *arguments = shlex.split(command)
    assert (program in ("make", "curl") or program.startswith(".venv/bin/")
            or (program == "bash" and (REPO / arguments[0]).is_file())), command
    if "-m" in arguments:
        module = arguments[arguments.index("-m") + 1]
        assert module == "pytest" or (REPO / module.replace(".", "/")).with_suffix(".py").is_file(), command


def test_the_resume_example_keeps_out_of_make_trains_folder():
    """The stop-early / resume pair writes to a folder of its own, not over the checkpoint `make train` left."""
    code = next(code for code in BASH_BLOCKS.values() if "--resume" in code)
    out_dirs = []
    for line in code.splitlines():
        arguments = shlex.split(line.split("#")[0])
        out_dirs.append(arguments[arguments.index("--out-dir") + 1] if "--out-dir" in arguments else "out")
    assert len(out_dirs) == 2 and len(set(out_dirs)) == 1 and out_dirs[0] != "out", out_dirs
