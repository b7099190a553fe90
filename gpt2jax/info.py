"""`python -m gpt2jax.info`: where a GPT-2's parameters live, and what weight tying saves.

    python -m gpt2jax.info --preset gpt2 [--pos rope] [--untied] [--norm rmsnorm] ...
    python -m gpt2jax.info --all      # tied vs untied for every preset
"""

from __future__ import annotations

import sys

from gpt2jax import cli
from gpt2jax.config import NORM_PLACEMENTS, NORMS, POS_EMBEDDINGS, PRESETS, GPTConfig
from gpt2jax.model import param_breakdown

ROWS = ("token_embedding", "position_embedding", "attention", "mlp", "norms", "lm_head",
        "per_block", "total")


def _breakdown_table(config: GPTConfig, name: str) -> str:
    counts = param_breakdown(config)
    lines = [f"{name}: n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
             f"pos={config.pos_embedding} placement={config.norm_placement} norm={config.norm} "
             f"tied={config.tie_embeddings}"]
    for row in ROWS:
        share = 100.0 * counts[row] / counts["total"]
        lines.append(f"  {row:<20} {counts[row]:>15,}  {share:6.2f}%")
    lines.append(f"  {'embedding share':<20} {counts['embedding_share_pct']:>22.2f}%")
    return "\n".join(lines)


def _tying_table() -> str:
    lines = [f"{'preset':<12} {'tied':>15} {'untied':>15} {'saved by tying':>15} "
             f"{'emb. share (tied)':>18}"]
    for name in PRESETS:
        tied = param_breakdown(GPTConfig.preset(name))
        untied = param_breakdown(GPTConfig.preset(name, tie_embeddings=False))
        saved = untied["total"] - tied["total"]
        lines.append(f"{name:<12} {tied['total']:>15,} {untied['total']:>15,} "
                     f"{saved:>15,} {tied['embedding_share_pct']:>17.2f}%")
    return "\n".join(lines)


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser("python -m gpt2jax.info", description=__doc__)
    p.add_argument("--preset", default="gpt2", choices=PRESETS)
    p.add_argument("--all", action="store_true", help="tied vs untied table for every preset")
    p.add_argument("--pos", choices=POS_EMBEDDINGS)
    p.add_argument("--norm-placement", choices=NORM_PLACEMENTS)
    p.add_argument("--norm", choices=NORMS)
    p.add_argument("--untied", action="store_true")
    p.add_argument("--no-bias", action="store_true")
    return p


def _info(args) -> None:
    if args.all:
        print(_tying_table())
        return
    overrides = {"tie_embeddings": not args.untied, "bias": not args.no_bias}
    if args.pos:
        overrides["pos_embedding"] = args.pos
    if args.norm_placement:
        overrides["norm_placement"] = args.norm_placement
    if args.norm:
        overrides["norm"] = args.norm
    print(_breakdown_table(GPTConfig.preset(args.preset, **overrides), args.preset))


def main(argv=None) -> int:
    return cli.run(_info, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
