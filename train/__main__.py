"""python -m train --preset shakespeare [flags]: parse arguments, call train.train().

The compute dtype defaults to bfloat16 on a GPU or TPU and float32 on CPU (--dtype overrides).
Several processes (a cluster, or `python -m train.launch` on one machine) run this same command;
see docs/training.md, "Scale out".

LoRA fine-tuning of a trained model on new text (the base may be an int8 checkpoint), or
continuing a peft adapter:

    python -m train --init-from ckpt:out/shakespeare --lora-rank 8 --lora-alpha 16 --rslora \
        --lora-dropout 0.05 --data my_text.txt --out out/lora --max-steps 300
    python -m train --init-from hf:gpt2-dir --lora-from peft-adapter-dir --data my_text.txt
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import traceback
from pathlib import Path

import jax

from gpt2jax import cli, lora, sharding
from gpt2jax import config as model_config_lib
from gpt2jax.config import GPTConfig
from train import config as config_lib
from train import optim
from train.trainer import NonFiniteLossError, train

# (flag, GPTConfig field, type, choices): every model switch is reachable from the CLI.
MODEL_FLAGS = (
    ("--n-layer", "n_layer", int, None),
    ("--n-head", "n_head", int, None),
    ("--n-embd", "n_embd", int, None),
    ("--block-size", "block_size", int, None),
    ("--vocab-size", "vocab_size", int, None),
    ("--dropout", "dropout", float, None),
    ("--pos", "pos_embedding", str, model_config_lib.POS_EMBEDDINGS),
    ("--norm-placement", "norm_placement", str, model_config_lib.NORM_PLACEMENTS),
    ("--norm", "norm", str, model_config_lib.NORMS),
    ("--rope-base", "rope_base", float, None),
    ("--layer-norm-epsilon", "layer_norm_epsilon", float, None),
    ("--dtype", "dtype", str, model_config_lib.DTYPES),
    ("--param-dtype", "param_dtype", str, model_config_lib.DTYPES),
    ("--attention", "attention_impl", str, model_config_lib.ATTENTION_IMPLS),
    ("--init-std", "init_std", float, None),
)
TRAIN_FLAGS = (
    ("--data", "data", str), ("--out", "out", str), ("--seed", "seed", int),
    ("--max-steps", "max_steps", int), ("--batch-size", "batch_size", int),
    ("--grad-accum", "grad_accum", int), ("--lr", "lr", float), ("--min-lr", "min_lr", float),
    ("--warmup-steps", "warmup_steps", int), ("--weight-decay", "weight_decay", float),
    ("--beta1", "beta1", float), ("--beta2", "beta2", float), ("--grad-clip", "grad_clip", float),
    ("--muon-lr", "muon_lr", float), ("--muon-momentum", "muon_momentum", float),
    ("--eval-every", "eval_every", int), ("--eval-batches", "eval_batches", int),
    ("--final-eval-batches", "final_eval_batches", int),
    ("--ckpt-every", "ckpt_every", int), ("--keep-checkpoints", "keep_checkpoints", int),
    ("--max-minutes", "max_minutes", float), ("--init-from", "init_from", str),
    ("--peak-flops", "peak_flops", float), ("--sample-tokens", "sample_tokens", int),
    ("--temperature", "temperature", float), ("--top-k", "top_k", int),
    ("--lora-rank", "lora_rank", int), ("--lora-alpha", "lora_alpha", float),
    ("--lora-dropout", "lora_dropout", float), ("--lora-from", "lora_from", str),
)
LORA_SHAPE_FIELDS = ("lora_rank", "lora_alpha", "rslora", "lora_targets", "lora_dropout")
HELP = {
    "max_steps": "TrainConfig.max_steps; a preset's warmup_steps that would not fit shrinks to "
                 "max_steps // 10 unless --warmup-steps is given",
    "muon_lr": "with --optimizer muon: Muon's peak learning rate, on the same warmup + cosine "
               "shape as --lr (default 0.02)",
    "muon_momentum": "with --optimizer muon: its Nesterov momentum, in [0, 1) (default 0.95)",
    "lora_dropout": "with --lora-rank: share of the adapters' input dropped in training (as "
                    "peft's lora_dropout; default 0)",
    "lora_from": "a peft LoRA folder (adapter_config.json + adapter_model.safetensors) to "
                 "continue training, over --init-from; rank, alpha, targets and dropout come "
                 "from it",
}


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(
        "python -m train",
        description="Train a GPT-2-shaped model. A --preset gives every default; flags "
        "override single fields (python -m train --preset shakespeare --print-config).",
    )
    p.add_argument("--preset", default="shakespeare",
                   help=f"train recipe: {', '.join(config_lib.PRESETS)} (default shakespeare)")
    p.add_argument("--model", help=f"start from a model shape: "
                   f"{', '.join(model_config_lib.PRESETS)} (default: the preset's)")
    for flag, field, typ, choices in MODEL_FLAGS:
        p.add_argument(flag, dest=field, type=typ, choices=choices, help=f"GPTConfig.{field}")
    p.add_argument("--untied", dest="tie_embeddings", action="store_false", default=None,
                   help="separate lm_head instead of sharing wte")
    p.add_argument("--tied", dest="tie_embeddings", action="store_true")
    p.add_argument("--no-bias", dest="bias", action="store_false", default=None,
                   help="no biases in Linear and LayerNorm")
    p.add_argument("--bias", dest="bias", action="store_true")
    for flag, field, typ in TRAIN_FLAGS:
        p.add_argument(flag, dest=field, type=typ, help=HELP.get(field, f"TrainConfig.{field}"))
    p.add_argument("--optimizer", choices=optim.OPTIMIZERS,
                   help="adamw (default), or muon: Muon for the blocks' Linear kernels, AdamW "
                        "for embeddings, head, biases, norm gains and LoRA factors")
    p.add_argument("--rslora", action="store_true", default=None,
                   help="with --lora-rank: scale adapters by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--lora-targets", dest="lora_targets", nargs="+", metavar="TARGET",
                   help=f"with --lora-rank: modules to adapt ({', '.join(lora.TARGETS)}; "
                   f"default c_attn.qv)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from the newest complete checkpoint in --out")
    p.add_argument("--mesh", help="device mesh, e.g. data=4 (data parallel over 4 devices)")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="also shard params and optimizer state over the data axis")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit")
    p.add_argument("--results", type=Path, metavar="FILE.json",
                   help="also write the run's summary.json with this command line to FILE.json "
                        "and its loss curve to FILE.png (how eval/results/train_shakespeare.json "
                        "is made)")
    return p


def config_from_args(args: argparse.Namespace, platform: str = "cpu") -> config_lib.TrainConfig:
    """The run `args` describe on `platform` (jax.default_backend()), which picks the compute
    dtype when --dtype does not."""
    cfg = config_lib.preset(args.preset)
    model = GPTConfig.preset(args.model) if args.model else cfg.model
    model_changes = {field: getattr(args, field) for _, field, _, _ in MODEL_FLAGS}
    model_changes.update(tie_embeddings=args.tie_embeddings, bias=args.bias,
                         dtype=args.dtype or config_lib.platform_dtype(platform))
    model = model.replace(**{k: v for k, v in model_changes.items() if v is not None})
    changes = {field: getattr(args, field) for _, field, _ in TRAIN_FLAGS}
    changes.update(optimizer=args.optimizer, resume=args.resume, fsdp=args.fsdp, rslora=args.rslora,
                   lora_targets=tuple(args.lora_targets) if args.lora_targets else None,
                   mesh_data=sharding.parse_mesh(args.mesh) if args.mesh else None)
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.max_minutes == 0:  # no time budget
        changes["max_minutes"] = None
    if args.lora_from is not None:
        given = [f"--{f.replace('_', '-')}" for f in LORA_SHAPE_FIELDS if f in changes]
        if given:
            raise ValueError(f"--lora-from {args.lora_from} sets the adapters' rank, alpha, "
                             f"targets and dropout from its adapter_config.json: drop "
                             f"{', '.join(given)}")
    if "max_steps" in changes and "warmup_steps" not in changes:
        if cfg.warmup_steps >= changes["max_steps"]:  # e.g. a 2-step smoke run of a preset
            changes["warmup_steps"] = changes["max_steps"] // 10
    return cfg.replace(model=model, **changes)


def _fail(message: str, code: int) -> int:
    """Print `message`; one of several processes then leaves at once (see exit_at_once)."""
    print(message, file=sys.stderr)
    if jax.process_count() > 1:
        sharding.exit_at_once(code)
    return code


def _train(args, argv: list[str]) -> int:
    sharding.initialize_distributed()  # before anything touches a device (the platform does)
    cfg = config_from_args(args, jax.default_backend())
    if args.print_config:
        print(cfg.to_json())
        return 0
    try:
        result = train(cfg, progress=not args.no_progress)
    except NonFiniteLossError as e:  # not a bad input: status 1
        return _fail(f"python -m train: error: {e}", 1)
    except (ValueError, OSError) as e:  # bad input: one line (cli.run) from a lone process
        if jax.process_count() == 1:
            raise
        return _fail(f"python -m train: error: {e}", cli.USAGE_ERROR)
    except Exception:
        if jax.process_count() == 1:
            raise
        return _fail(traceback.format_exc(), 1)
    if jax.process_index() > 0:  # process 0 reports for the run
        return 0
    if result.val_loss is not None:
        print(f"step {result.step}: val loss {result.val_loss:.4f} after "
              f"{result.elapsed_s / 60:.1f} min ({result.stopped}); run folder {result.out}")
    else:
        print(f"stopped at step {result.step} ({result.stopped}); checkpoint in {result.out}")
    if result.sample:
        print("---- sample ----")
        print(result.sample)
    if args.results:
        write_results(result.out, args.results, "python -m train " + shlex.join(argv))
    return 0


def write_results(run_dir: Path, path: Path, command: str) -> None:
    """The run's summary.json plus `command` to `path`, its loss curve to path.png."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**summary, "command": command}, indent=2))
    shutil.copyfile(Path(run_dir) / "loss_curve.png", path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.run(lambda args: _train(args, argv), build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
