"""gpt-sample: load a checkpoint written by gpt-train and print generated text.

    gpt-sample --prompt "def " --max-new-tokens 300 --temperature 0.8 --top-k 20
"""

import argparse
import sys
from pathlib import Path

import torch

from gpt.checkpoint import CHECKPOINT_NAME, load_checkpoint, resolve_backends
from gpt.data import CharTokenizer
from gpt.model import GPT, GPTConfig


def default_prompt(tokenizer: CharTokenizer) -> str:
    return "\n" if "\n" in tokenizer.stoi else tokenizer.chars[0]


def sample_text(model: GPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int, temperature=1.0,
                top_k=None, seed=1337) -> str:  # fmt: skip
    """The prompt followed by `max_new_tokens` sampled characters (the prompt must use the vocabulary)."""
    device = next(model.parameters()).device
    idx = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    model.train(was_training)
    return tokenizer.decode(out[0])


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="gpt-sample", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help=f"checkpoint file (default: <out-dir>/{CHECKPOINT_NAME})")
    p.add_argument("--out-dir", default="out", help="directory gpt-train wrote to (default: out)")
    p.add_argument("--prompt", help="text to continue; its characters must be in the checkpoint's vocabulary "
                   "(default: a newline)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=1.0, help="below 1 is more conservative, above 1 more varied")
    p.add_argument("--top-k", type=int, help="sample only among the k most likely characters")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when present, else cpu)")
    return p, p.parse_args(argv)


def print_to_stderr(message: str):
    print(message, file=sys.stderr)


def main(argv=None):
    parser, args = parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be non-negative, got {args.max_new_tokens}")
    if args.temperature <= 0:
        parser.error(f"--temperature must be positive, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} requested but CUDA is not available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = Path(args.checkpoint) if args.checkpoint else Path(args.out_dir) / CHECKPOINT_NAME
    try:
        checkpoint = load_checkpoint(path, device)
    except FileNotFoundError as e:
        parser.error(str(e))

    tokenizer = CharTokenizer(checkpoint["vocab"])
    prompt = default_prompt(tokenizer) if args.prompt is None else args.prompt
    if not prompt:
        parser.error("--prompt must not be empty")
    try:
        tokenizer.encode(prompt)
    except ValueError as e:
        parser.error(f"--prompt: {e} (the checkpoint was trained on {tokenizer.vocab_size} characters)")

    saved = checkpoint["config"]
    attention, layernorm = resolve_backends(saved["attention"], saved["layernorm"], device, log=print_to_stderr)
    model = GPT(GPTConfig(**{**saved, "attention": attention, "layernorm": layernorm})).to(device)
    model.load_state_dict(checkpoint["model"])
    print(sample_text(model, tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed))


if __name__ == "__main__":
    main()
