"""python -m train.prepare --data (PATH | shakespeare) --out DIR [--block-size T]"""

from __future__ import annotations

import argparse
import sys

from gpt2jax import data as corpus
from train import data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.prepare",
        description="Encode text with the GPT-2 tokenizer into DIR/{train,val}.bin "
        "(uint16, 90/10) and DIR/meta.json.",
    )
    parser.add_argument("--data", required=True, help=(
        f"a UTF-8 .txt file, a folder of them, or a dataset name ({', '.join(data.DATASETS)}; "
        f"looked up in $GPT2JAX_DATA_DIR, then {corpus.cache_dir()}, then downloaded)"))
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--block-size", type=int, default=128,
                        help="each split must hold at least block_size + 1 tokens")
    args = parser.parse_args(argv)
    try:
        meta = data.prepare(args.data, args.out, block_size=args.block_size)
    except (data.DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
          f"(source sha256 {meta['source_sha256'][:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
