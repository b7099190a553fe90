"""Training throughput: gpt2jax's jitted train step against the strongest PyTorch step we have.

    python -m eval.bench_train [--json PATH] [--quick] [--dtypes fp32 bf16] [--readme]

Three sides, same shapes, same threads, one run, taking turns step by step:

- `gpt2jax`: `train.step.make_train_step` under `jax.jit` (the trainer's own step).
- `gpt2jax_muon`: the same step with `--optimizer muon` (optax's Muon on the blocks' kernels,
  AdamW on the rest): what Muon's Newton-Schulz iterations cost per step.
- `torch_compiled`: a nanoGPT-style model written here (fused c_attn,
  `F.scaled_dot_product_attention(is_causal=True)`, tanh GELU, tied head, our vocabulary of
  50,257) under `torch.compile`, with the fastest AdamW torch offers on the CPU (fused, else
  foreach) — the reference to beat.
- `torch` (HF): transformers' `GPT2LMHeadModel` in eager mode with AdamW.

Every side does a whole optimizer step: forward, cross-entropy over the whole vocabulary,
backward, global-norm clip at 1.0, AdamW (weight decay 0.1), dropout 0. Shapes: `baby`
(6 x 384, batch 8 x 256) and the 124M shape (12 x 768, batch 4 x 256). Step times are the
median of >= 20 interleaved steps; the peak is the median of >= 5 sustained 2048^3 float32
matmul loops of each framework in the same run, and MFU is model FLOPs per second (6 per
weight per token plus attention, `train.perf.flops_per_token`) over that peak. The CPU model,
the cores the process may use and its scheduling policy go into the JSON: on a shared machine
run it as `chrt -f 1 python -m eval.bench_train` so that other work cannot take turns inside
a step. The JSON is a `TrainResult` record (`eval.common.write_record`).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from eval import common
from gpt2jax.config import GPTConfig
from gpt2jax.model import init_params
from train import optim, perf
from train import step as step_lib

SHAPES = {  # name -> (model preset, batch, seq)
    "baby": ("baby", 8, 256),
    "124m": ("gpt2", 4, 256),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
SIDES = ("gpt2jax", "gpt2jax_muon", "torch_compiled", "torch")
PEAK_N = 2048


@dataclasses.dataclass(frozen=True)
class TrainFigure:
    shape: str  # a SHAPES name
    dtype: str  # a DTYPES name
    side: str  # a SIDES name
    tok_s: float  # batch * seq / the median step
    mfu_own_peak: float  # model FLOP/s over its framework's matmul peak in the same run
    first_step_s: float  # compile included


@dataclasses.dataclass(frozen=True)
class TrainResult:
    machine: common.Machine
    code: str | None  # common.code_hash() at the run; None: run before records kept it
    command: str | None
    jax: str
    torch: str
    jax_fp32_flops: float  # sustained PEAK_N^3 float32 matmul FLOP/s
    torch_fp32_flops: float
    torch_adamw: str  # "fused" or "foreach"
    timed_steps: int
    dropout: float
    figures: tuple[TrainFigure, ...]

    def figure(self, side: str, shape: str, dtype: str) -> TrainFigure:
        return common.lookup(self.figures, side=side, shape=shape, dtype=dtype)

    def gpt2jax_over(self, side: str, shape: str, dtype: str) -> float:
        """gpt2jax's tokens/s over the side's (its step time over gpt2jax's)."""
        return self.figure("gpt2jax", shape, dtype).tok_s / self.figure(side, shape, dtype).tok_s


def time_steps(run_step, warmup: int, steps: int) -> float:
    """Median seconds of one blocking `run_step()`."""
    return _time_interleaved({"only": run_step}, warmup, steps)["only"]


def _time_interleaved(runners: dict, warmup: int, steps: int) -> dict[str, float]:
    """Median seconds per call of each blocking `runners[name]()`, the sides taking turns
    step by step so that load from other processes hits them alike."""
    for _ in range(warmup):
        for run_step in runners.values():
            run_step()
    times = {name: [] for name in runners}
    for _ in range(steps):
        for name, run_step in runners.items():
            t = time.perf_counter()
            run_step()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _jax_step(config: GPTConfig, batch: int, seq: int, optimizer: str = "adamw"):
    """(jitted train step, its state, x, y, lr) as the trainer builds them."""
    optimizer = optim.make_optimizer(weight_decay=0.1, optimizer=optimizer, lr=1e-4)
    state = step_lib.init_state(init_params(config, jax.random.PRNGKey(0)), optimizer, 0)
    train_step = jax.jit(step_lib.make_train_step(config, optimizer), donate_argnums=0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, batch, seq + 1))
    x, y = (jax.device_put(a.astype(np.int32)) for a in (tokens[..., :-1], tokens[..., 1:]))
    return train_step, state, x, y, np.float32(1e-4)


def compiled_step_text(config: GPTConfig, batch: int, seq: int) -> str:
    """The optimized HLO of the train step the benchmark times."""
    train_step, *args = _jax_step(config, batch, seq)
    return train_step.lower(*args).compile().as_text()


def jax_runner(config: GPTConfig, batch: int, seq: int, optimizer: str = "adamw"):
    """(run one train step and block, seconds the first step took: compile included)."""
    train_step, state, x, y, lr = _jax_step(config, batch, seq, optimizer)

    def run_step():
        nonlocal state
        state, _ = train_step(state, x, y, lr)
        jax.block_until_ready(state)  # the whole update, not just the loss

    return run_step, _timed(run_step)


def _torch_step(model, config: GPTConfig, batch: int, seq: int, optimizer):
    import torch

    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    bf16 = config.dtype == "bfloat16"
    params = [p for p in model.parameters() if p.requires_grad]

    def run_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        logits = getattr(logits, "logits", logits)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()

    return run_step, _timed(run_step)


def _adamw(model):
    """torch's fastest CPU AdamW: fused where this torch has it, else foreach."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True), "fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=True), "foreach"


def hf_runner(config: GPTConfig, batch: int, seq: int):
    """Hugging Face's GPT2LMHeadModel, eager, with AdamW."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(hf_config).train()
    return _torch_step(model, config, batch, seq, _adamw(model)[0])


def nanogpt_model(config: GPTConfig):
    """nanoGPT's model (Karpathy), written out: the strongest plain PyTorch GPT-2 we know."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    D, H = config.n_embd, config.n_head

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.c_attn, self.attn_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
            self.c_fc, self.mlp_proj = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
            q, k, v = (a.view(B, T, H, D // H).transpose(1, 2) for a in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, D))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(config.vocab_size, D)
            self.wpe = nn.Embedding(config.block_size, D)
            self.h = nn.ModuleList(Block() for _ in range(config.n_layer))
            self.ln_f = nn.LayerNorm(D)
            self.lm_head = nn.Linear(D, config.vocab_size, bias=False)
            self.lm_head.weight = self.wte.weight  # tied, as GPT-2

        def forward(self, idx):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            return self.lm_head(self.ln_f(x))

    torch.manual_seed(0)
    return GPT().train()


def compiled_runner(config: GPTConfig, batch: int, seq: int):
    """nanoGPT's model under torch.compile, fused (or foreach) AdamW."""
    import torch

    model = nanogpt_model(config)
    optimizer, _ = _adamw(model)
    return _torch_step(torch.compile(model), config, batch, seq, optimizer)


RUNNERS = {"gpt2jax": jax_runner,  # side -> (config, batch, seq) -> (run_step, first step s)
           "gpt2jax_muon": lambda *shape: jax_runner(*shape, optimizer="muon"),
           "torch_compiled": compiled_runner, "torch": hf_runner}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def framework_peaks() -> dict[str, float]:
    import torch

    a = torch.ones(PEAK_N, PEAK_N)
    return {"jax_fp32_flops": perf.measure_peak_flops("float32", PEAK_N),
            "torch_fp32_flops": perf.sustained_flops(lambda: a @ a, PEAK_N)}


def run(quick: bool = False, dtypes=tuple(DTYPES), command: str | None = None,
        sides=SIDES) -> TrainResult:
    import torch

    torch.set_num_threads(common.cores())  # XLA's CPU client uses every core it is given
    warmup, steps = (1, 3) if quick else (2, 20)
    code, peaks = common.code_hash(), framework_peaks()
    _, adamw_kind = _adamw(torch.nn.Linear(2, 2))
    figures = []
    for shape, (preset, batch, seq) in SHAPES.items():
        for dname in dtypes:
            config = GPTConfig.preset(preset, dtype=DTYPES[dname])
            flops = perf.flops_per_token(config, seq)
            print(f"{shape} {dname} (batch {batch} x {seq}) ...", flush=True)
            runners = {side: RUNNERS[side](config, batch, seq) for side in sides}
            step_s = _time_interleaved({k: r[0] for k, r in runners.items()}, warmup, steps)
            for side in sides:
                own_peak = peaks["jax_fp32_flops" if side.startswith("gpt2jax")
                                 else "torch_fp32_flops"]
                tok_s = batch * seq / step_s[side]
                figures.append(TrainFigure(shape, dname, side, tok_s, tok_s * flops / own_peak,
                                           runners[side][1]))
            del runners
    return TrainResult(machine=common.Machine.current(), code=code, command=command,
                       jax=jax.__version__, torch=torch.__version__, **peaks,
                       torch_adamw=adamw_kind, timed_steps=steps, dropout=0.0,
                       figures=tuple(figures))


def format_table(result: TrainResult) -> str:
    m = result.machine
    lines = [
        f"{m.cpu}, {m.cores} cores ({m.sched}); peak fp32 2048^3 matmul: jax "
        f"{result.jax_fp32_flops / 1e9:.0f} GFLOP/s, torch "
        f"{result.torch_fp32_flops / 1e9:.0f} GFLOP/s; median of "
        f"{result.timed_steps} interleaved steps; torch AdamW {result.torch_adamw}",
        "",
        "| shape | dtype | side | tokens/s | MFU (own peak) | first step s | gpt2jax / side |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for f in result.figures:
        ratio = ("" if f.side == "gpt2jax"
                 else f"{result.gpt2jax_over(f.side, f.shape, f.dtype):.2f}x")
        lines.append(f"| {f.shape} | {f.dtype} | {f.side} | {f.tok_s:.0f} | "
                     f"{f.mfu_own_peak:.1%} | {f.first_step_s:.1f} | {ratio} |")
    return "\n".join(lines)


def readme_table(paths) -> str:
    """docs/results.md's training rows: one per host (JSON file) and shape, fp32."""
    lines = ["| host | shape | gpt2jax tok/s | MFU (JAX's own peak) | torch.compile nanoGPT "
             "tok/s | HF eager tok/s | gpt2jax / compiled | gpt2jax / HF |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for path in paths:
        r = common.read_record(path, TrainResult)
        host = f"{r.machine.cpu}, {r.machine.cores} cores"
        for shape in SHAPES:
            ours = r.figure("gpt2jax", shape, "fp32")
            lines.append(
                f"| {host} | {shape} | {ours.tok_s:.0f} | {ours.mfu_own_peak:.0%} | "
                f"{r.figure('torch_compiled', shape, 'fp32').tok_s:.0f} | "
                f"{r.figure('torch', shape, 'fp32').tok_s:.0f} | "
                f"{r.gpt2jax_over('torch_compiled', shape, 'fp32'):.2f}x | "
                f"{r.gpt2jax_over('torch', shape, 'fp32'):.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="3 timed steps (smoke test)")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                        help="which steps to time (gpt2jax always; e.g. --sides gpt2jax "
                             "gpt2jax_muon for Muon's cost alone)")
    parser.add_argument("--readme", action="store_true",
                        help="rewrite docs/results.md's training table from "
                        "eval/results/bench_train*.json")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not args.readme or args.json:
        sides = ["gpt2jax", *(s for s in args.sides if s != "gpt2jax")]
        results = run(quick=args.quick, dtypes=tuple(args.dtypes),
                      command=common.command_line("eval.bench_train", argv), sides=sides)
        print(format_table(results))
        if args.json:
            common.write_record(args.json, results)
            args.json.with_suffix(".md").write_text(
                "# Training throughput\n\n`python -m eval.bench_train`\n\n"
                + format_table(results) + "\n")
            print(f"wrote {args.json}")
    if args.readme:
        common.write_readme_block(
            "bench_train", readme_table(sorted(common.RESULTS.glob("bench_train*.json"))),
            common.RESULTS_DOC)
        muon = common.RESULTS / "muon_step.json"  # --sides gpt2jax gpt2jax_muon
        if muon.exists():
            result = common.read_record(muon, TrainResult)
            common.write_readme_block("muon_step", f"`{result.command}`\n\n"
                                      + format_table(result), common.RESULTS_DOC)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
