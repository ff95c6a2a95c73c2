"""The README and the docs/ pages as a newcomer uses them: every python block defines what it uses and runs as
printed (blocks written for a GPU, where there is one), every command they print runs from a fresh clone after
`make`, and every relative link leads to a file, and a heading, that exists. docs/README.md says the same to
whoever writes a page."""

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
DOCS = REPO / "docs"
PAGE_PATHS = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
PAGES = {path.relative_to(REPO).as_posix(): path.read_text(encoding="utf-8") for path in PAGE_PATHS}

# A fenced block (its language, possibly none, and its code) or a heading outside one: matched left to right, a
# block's own lines (a python comment, a shell prompt) are never taken for headings.
FENCE_OR_HEADING = re.compile(r"^```(\w*)\n(.*?)^```$|^#+ ([^\n]*)$", re.MULTILINE | re.DOTALL)
FENCE = re.compile(r"^```\w*\n.*?^```$", re.MULTILINE | re.DOTALL)


def page_blocks(language):
    """{"<page>: <heading> #<n>": code} for every ```<language> block of every page, named after the heading above."""
    blocks = {}
    for page, text in PAGES.items():
        heading, count = None, {}
        for match in FENCE_OR_HEADING.finditer(text):
            if match[3] is not None:
                heading = match[3].replace("`", "")
            elif match[1] == language:
                count[heading] = count.get(heading, 0) + 1
                blocks[f"{page}: {heading} #{count[heading]}"] = match[2]
    return blocks


PYTHON_BLOCKS = page_blocks("python")
BASH_BLOCKS = page_blocks("bash")


def written_for_a_gpu(code):
    """A block that puts its work on "cuda" needs a GPU, unless it asks whether there is one and picks its device."""
    return "cuda" in code and "torch.cuda.is_available()" not in code


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


def test_every_page_has_runnable_blocks_found():
    """The README and the pages that show code are read: a changed fence or heading style would skip them silently."""
    pages_with_python = {block.split(":")[0] for block in PYTHON_BLOCKS}
    assert {"README.md", "docs/attention.md", "docs/training.md", "docs/transformers.md"} <= pages_with_python
    assert any(block.startswith("README.md:") for block in BASH_BLOCKS)


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
                    "wrongly), and torch.compile's Inductor cannot run the interpreted kernels")
    monkeypatch.chdir(reader_folder)
    if "TRITON_INTERPRET" in code:  # it shows how to set it up: in a fresh interpreter, as a reader runs it
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr
    else:  # with the threads gpt-train and gpt-sample use on a CPU (torch's default can be 10x slower: see
        # docs/training.md, Threads)
        threads = torch.get_num_threads()
        torch.set_num_threads(DEFAULT_CPU_THREADS)
        try:
            exec(compile(code, block, "exec"), {})
        finally:
            torch.set_num_threads(threads)


def table_commands(text):
    """The first cells of the rows of every table whose first column is headed "command"."""
    commands = []
    for table in re.findall(r"(?:^\|[^\n]*\n?)+", FENCE.sub("", text), re.MULTILINE):
        header, _separator, *rows = table.splitlines()
        if header.strip("| ").split("|")[0].strip() == "command":
            for row in rows:
                cell = row.strip("| ").split(" | ")[0].strip()
                commands.append(cell[1:-1] if re.fullmatch(r"`[^`]+`", cell) else cell)
    return commands


def printed_commands():
    """Every command the pages print: the lines of their bash blocks and the commands of their command tables."""
    lines = [line.split("  #")[0].strip() for code in BASH_BLOCKS.values() for line in code.splitlines()]
    return list(dict.fromkeys(line for line in lines + [c for text in PAGES.values() for c in table_commands(text)]
                              if line))


def test_command_tables_are_found():
    assert {".venv/bin/python -m bench.attention", ".venv/bin/python -m tools.tiles.report"} <= set(
        printed_commands())


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
    examples = [code for code in BASH_BLOCKS.values() if "--resume" in code]
    assert examples
    for code in examples:
        out_dirs = []
        for line in code.splitlines():
            arguments = shlex.split(line.split("#")[0])
            out_dirs.append(arguments[arguments.index("--out-dir") + 1] if "--out-dir" in arguments else "out")
        assert len(out_dirs) == 2 and len(set(out_dirs)) == 1 and out_dirs[0] != "out", out_dirs


def anchors(text):
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = [match[3] for match in FENCE_OR_HEADING.finditer(text) if match[3] is not None]
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def relative_links(text):
    """The targets of a page's links and images that are not web addresses (code blocks left out)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", text))
    return [target for target in targets if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_lead_to_what_exists(page):
    for target in relative_links(PAGES[page]):
        path, _, fragment = target.partition("#")
        linked = ((REPO / page).parent / path).resolve() if path else REPO / page
        assert linked.exists() and REPO in linked.parents, f"{page} links to {target}, which does not exist"
        if fragment:
            assert linked.suffix == ".md" and fragment in anchors(linked.read_text(encoding="utf-8")), (
                f"{page} links to {target}, a heading {linked.name} does not have")


def test_every_docs_page_is_reached_from_the_readme():
    """The README links the docs index, and the index links every page."""
    assert "docs/README.md" in relative_links(PAGES["README.md"])
    indexed = {link.partition("#")[0] for link in relative_links(PAGES["docs/README.md"])}
    assert {path.name for path in DOCS.glob("*.md")} - {"README.md"} <= indexed


def repository_text_files():
    """The files a reader of the code reads: sources, scripts, docs; committed results are records and stay as
    they were written."""
    roots = [REPO / name for name in ("kernels", "gpt", "bench", "tests", "tools", "docs")]
    files = [REPO / name for name in ("README.md", "Makefile", "pyproject.toml")]
    for root in roots:
        files += [path for path in root.rglob("*") if path.suffix in (".py", ".md", ".sh", ".toml", ".txt")
                  and "__pycache__" not in path.parts and (REPO / "bench" / "results") not in path.parents]
    return files


def test_no_reference_to_issue_numbers_or_missing_files():
    """Code, messages and docs say what they mean ("the attention speed goals"), not which issue asked for it."""
    pointer = re.compile(r"\bissues? #?\d|\bMETHOD\.md\b", re.IGNORECASE)
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}" for path in repository_text_files()
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pointer.search(line)]
    assert not found, "\n".join(found)
