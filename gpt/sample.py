"""gpt-sample: load a checkpoint written by gpt-train and print generated text.

    gpt-sample --prompt "def " --max-new-tokens 300 --temperature 0.8 --top-k 20
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from gpt.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from gpt.cli import (add_device_arguments, check_device_arguments, default_device, exit_with_error, resolve_backends,
                     set_cpu_threads)  # fmt: skip
from gpt.data import CharTokenizer
from gpt.model import GPT, GPTConfig


def default_prompt(tokenizer: CharTokenizer) -> str:
    return "\n" if "\n" in tokenizer.stoi else tokenizer.chars[0]


def sample_text(model: GPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int, temperature=1.0,
                top_k=None, seed=1337, use_cache=True) -> str:  # fmt: skip
    """The prompt followed by `max_new_tokens` sampled characters (the prompt must use the vocabulary)."""
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                         use_cache=use_cache)
    model.train(was_training)
    return tokenizer.decode(out[0])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpt-sample", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help=f"checkpoint file (default: <out-dir>/{CHECKPOINT_NAME})")
    p.add_argument("--out-dir", default="out", help="directory gpt-train wrote to (default: out)")
    p.add_argument("--prompt", help="text to continue; its characters must be in the checkpoint's vocabulary "
                   "(default: a newline)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=1.0, help="below 1 is more conservative, above 1 more varied")
    p.add_argument("--top-k", type=int, help="sample only among the k most likely characters")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token instead of "
                   "keeping its keys and values (the same text, slower)")  # fmt: skip
    add_device_arguments(p)
    args = p.parse_args(argv)
    if args.max_new_tokens < 0:
        exit_with_error(p.prog, f"--max-new-tokens must be non-negative, got {args.max_new_tokens}")
    if not args.temperature > 0:
        exit_with_error(p.prog, f"--temperature must be positive, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        exit_with_error(p.prog, f"--top-k must be at least 1, got {args.top_k}")
    if args.prompt == "":
        exit_with_error(p.prog, "--prompt must not be empty")
    check_device_arguments(args, p.prog)
    return args


def print_to_stderr(message: str):
    print(message, file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    set_cpu_threads(args.threads, device)
    path = Path(args.checkpoint) if args.checkpoint else Path(args.out_dir) / CHECKPOINT_NAME
    try:
        checkpoint = load_checkpoint(path, device)
    except (FileNotFoundError, CheckpointError) as e:
        exit_with_error("gpt-sample", str(e))

    tokenizer = CharTokenizer(checkpoint["vocab"])
    prompt = default_prompt(tokenizer) if args.prompt is None else args.prompt
    try:
        tokenizer.encode(prompt)
    except ValueError as e:
        trained_on = f"the checkpoint was trained on {tokenizer.vocab_size} characters"
        exit_with_error("gpt-sample", f"--prompt: {e} ({trained_on})")

    saved = checkpoint["config"]
    attention, layernorm = resolve_backends(saved["attention"], saved["layernorm"], device, log=print_to_stderr)
    model = GPT(GPTConfig(**{**saved, "attention": attention, "layernorm": layernorm})).to(device)
    model.load_state_dict(checkpoint["model"])
    started = time.perf_counter()
    text = sample_text(model, tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                       use_cache=not args.no_cache)
    seconds = time.perf_counter() - started
    print(text)
    print_to_stderr(f"{args.max_new_tokens} tokens in {seconds:.2f} s ({args.max_new_tokens / seconds:.1f} tokens/s, "
                    f"{'recomputing the context' if args.no_cache else 'with a key/value cache'})")


if __name__ == "__main__":
    main()
