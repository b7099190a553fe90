"""`python -m gpt2jax.sample`: continue a prompt with a GPT-2 and print the text.

    python -m gpt2jax.sample --hf DIR --prompt "The meaning of life is" --max-new-tokens 40 \\
        --temperature 0.8 --top-k 50 --num-samples 3
    python -m gpt2jax.sample --ckpt runs/shakespeare --prompt "ROMEO:" --top-p 0.9 --stream

--hf reads a Hugging Face GPT-2 directory (config.json + model.safetensors), --ckpt a
training checkpoint. An empty --prompt starts from <|endoftext|>. --stream prints the text
as it is generated.
"""

from __future__ import annotations

import sys

import jax

from gpt2jax import cli, hf, tokenizer
from gpt2jax.generation import generate, generate_stream


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser("python -m gpt2jax.sample", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="DIR", help="Hugging Face GPT-2 model directory")
    source.add_argument("--ckpt", metavar="DIR", help="training checkpoint (or run) directory")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the full forward at every step (the reference path)")
    parser.add_argument("--stream", action="store_true",
                        help="print the text as it comes (one sample)")
    return parser


def _sample(args) -> None:
    if args.num_samples < 1:
        raise ValueError(f"--num-samples={args.num_samples} must be at least 1")
    if args.stream and args.num_samples > 1:
        raise ValueError(f"--stream prints one sample: drop --num-samples={args.num_samples} "
                         f"or --stream")
    if args.hf:
        config, params = hf.load(args.hf)
    else:
        from gpt2jax import sources  # orbax is needed only for training checkpoints

        config, params = sources.load_checkpoint(args.ckpt)
    prompt = tokenizer.encode(args.prompt) or [tokenizer.EOT_ID]
    eos_id = tokenizer.EOT_ID if tokenizer.EOT_ID < config.vocab_size else None
    kwargs = dict(max_new_tokens=args.max_new_tokens, key=jax.random.key(args.seed),
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  eos_id=eos_id, use_cache=not args.no_cache)
    if args.stream:  # the ValueErrors of bad arguments come before the first chunk
        chunks = generate_stream(params, config, [prompt], **kwargs)
        print(args.prompt, end="", flush=True)
        for text in tokenizer.decode_stream([t for t in c[0].tolist() if t != eos_id]
                                           for c in chunks):
            print(text, end="", flush=True)
        print()
        return
    out = generate(params, config, [prompt] * args.num_samples, **kwargs)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} of {args.num_samples} ---")
        print(args.prompt + tokenizer.decode(t for t in row if t != eos_id))


def main(argv=None) -> int:
    return cli.run(_sample, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
