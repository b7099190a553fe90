"""The training loop: `train(TrainConfig) -> TrainResult`, importable by eval programs.

Multi-process (`python -m train.launch`, srun, a TPU pod): every process runs this same loop
over one global mesh, reads only its own rows of each batch, and takes part in every
collective (steps, evals, checkpoint saves); metrics, the progress bar, the sample and the
files below come from process 0 alone.

Per run folder (`cfg.out`):

    data/            the prepared token files (when cfg.data was text, not a prepared folder)
    checkpoints/     orbax steps, the last `keep_checkpoints` of them
    metrics.jsonl    one record per step {"step", "loss", "lr", "grad_norm", "tok_s", "mfu",
                     "time_s"} and per eval {"step", "val_loss", "time_s"}
    loss_curve.png   train and val loss against wall-clock minutes
    summary.json     the final figures
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from gpt2jax import checkpoint as ckpt_lib
from gpt2jax import lora as lora_lib
from gpt2jax import sharding, sources, tokenizer
from gpt2jax.config import GPTConfig
from gpt2jax.generation import generate
from gpt2jax.model import init_params
from gpt2jax.quant import int8
from train import data as data_lib
from train import optim, perf
from train import step as step_lib
from train.config import TrainConfig, describe


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the message names the way out."""


@dataclasses.dataclass
class TrainResult:
    config: TrainConfig  # as trained (the model config resolved from --init-from)
    step: int
    stopped: str  # "max_steps" | "time" | "signal"
    losses: list[float]  # train loss of every step from step 1, resumed runs included
    val_loss: float | None  # on the whole val split, at the end (None when interrupted)
    wall_s: float  # this process's time in train()
    elapsed_s: float  # total across resumes
    tokens_per_s: float
    mfu: float
    sample: str | None
    out: Path


# ---------------------------------------------------------------------------- setup


def resolve_data(cfg: TrainConfig) -> Path:
    """A prepared dataset folder: cfg.data itself, or cfg.data prepared into out/data (by
    process 0, while the others wait)."""
    if data_lib.is_prepared(cfg.data):
        return Path(cfg.data)
    target = Path(cfg.out) / "data"
    if jax.process_index() == 0:
        data_lib.prepare(cfg.data, target, block_size=cfg.model.block_size)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("train data prepared")
    return target


def initial_params(cfg: TrainConfig) -> tuple[GPTConfig, dict]:
    """(model config, params) fresh from cfg.model, or from --init-from.

    With --init-from the architecture is the source's; only dropout, the compute dtype, the
    attention implementation and a smaller block_size (learned positions cropped, as nanoGPT
    does) come from cfg.model."""
    if cfg.init_from is None:
        return cfg.model, init_params(cfg.model, jax.random.PRNGKey(cfg.seed))
    config, params = sources.load_model(cfg.init_from, block_size=cfg.model.block_size)
    config = config.replace(dropout=cfg.model.dropout, dtype=cfg.model.dtype,
                            attention_impl=cfg.model.attention_impl)
    # host arrays: every process places its own shards of them (arrays committed to one
    # device cannot be placed on a mesh that spans other processes' devices)
    return config, jax.tree.map(np.asarray, params)


def initial_adapters(cfg: TrainConfig, config: GPTConfig):
    """(cfg with its lora_ fields resolved, the adapters to start from, or None for full
    training): read from the peft folder cfg.lora_from, else fresh at cfg.lora_rank."""
    if cfg.lora_from is None:
        if not cfg.lora_rank:
            return cfg, None
        key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
        return cfg, lora_lib.init(cfg.lora_config(), config, key)
    adapters = lora_lib.load_peft(cfg.lora_from, config)
    lc = adapters.config
    if cfg.lora_rank and cfg.lora_config() != lc:
        raise ValueError(
            f"lora_from={cfg.lora_from!r} holds {lc}, not the {cfg.lora_config()} the lora_ "
            f"fields ask for: leave them unset, the folder sets them")
    return cfg.replace(lora_rank=lc.rank, lora_alpha=lc.alpha, lora_targets=lc.targets,
                       rslora=lc.rslora, lora_dropout=lc.dropout), adapters


def sample_prompt(tokens, max_tokens: int = 16) -> list[int]:
    """The opening of `tokens` (the train split) up to its first line break, at most
    `max_tokens` ids: a real context to sample from. A bare "\n" left the main job's model
    at its unigram favourite, "\n": its sample began with nine blank lines."""
    ids = np.asarray(tokens[:max_tokens]).tolist()
    ends = [i for i, t in enumerate(ids) if i and "\n" in tokenizer.decode([t])]
    return ids[: ends[0] + 1] if ends else ids


def _truncate_metrics(path: Path, step: int) -> list[float]:
    """Drop records past `step` (written after the checkpoint we resume from); return the
    train losses kept."""
    if not path.exists():
        return []
    kept = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return [r["loss"] for r in kept if "loss" in r]


def _agree(signal: str | None, fraction: float) -> tuple[bool, float]:
    """(some process was signalled, process 0's time fraction): all processes must stop at
    the same step and use the same learning rate, whatever their own clocks say."""
    if jax.process_count() == 1:
        return signal is not None, fraction
    votes = multihost_utils.process_allgather(np.array([signal is not None, fraction]))
    return bool(votes[:, 0].any()), float(votes[0, 1])


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and returns."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------- pieces


def evaluate(eval_fn, params, tokens, cfg: TrainConfig, batch_sharding, max_batches=None,
             frozen=()):
    """Mean loss over the non-overlapping windows of `tokens` (see data.eval_batches);
    `frozen` is (base,) under LoRA adapters, () otherwise."""
    total, weight = 0.0, 0.0
    w_sharding = sharding.batch_sharding(batch_sharding.mesh, 1)
    B, T = cfg.batch_size, cfg.model.block_size
    put = jax.make_array_from_process_local_data
    rows = sharding.process_rows(batch_sharding, (B, T))
    for x, y, w in data_lib.eval_batches(tokens, T, B, max_batches, rows):
        s, n = eval_fn(params, put(batch_sharding, x, (B, T)), put(batch_sharding, y, (B, T)),
                       put(w_sharding, w, (B,)), *frozen)
        total, weight = total + float(s), weight + float(n)
    return total / weight


def sample_text(params, config: GPTConfig, cfg: TrainConfig, prompt: list[int]) -> str:
    """The text of `prompt` (token ids) and `cfg.sample_tokens` tokens continuing it (fewer
    if learned positions end first)."""
    n = cfg.sample_tokens
    if config.pos_embedding == "learned":
        n = min(n, config.block_size - len(prompt))
    out = generate(params, config, [prompt], max_new_tokens=n,
                   key=jax.random.PRNGKey(cfg.seed), temperature=cfg.temperature,
                   top_k=cfg.top_k)
    return tokenizer.decode(prompt + np.asarray(out[0]).tolist())


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Train loss (per step and a 25-step mean) and val loss against wall-clock minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = np.array([(r["time_s"] / 60, r["loss"]) for r in records if "loss" in r])
    evals = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(train):
        ax.plot(train[:, 0], train[:, 1], lw=0.5, alpha=0.35, color="C0")
        n = min(25, len(train))
        mean = np.convolve(train[:, 1], np.ones(n) / n, mode="valid")
        ax.plot(train[n - 1 :, 0], mean, color="C0", label=f"train ({n}-step mean)")
    if evals:
        most = max(r["eval_windows"] for r in evals)
        for full, style, label in ((False, "o-", "val (subset)"), (True, "s", "val (all)")):
            pts = [(r["time_s"] / 60, r["val_loss"]) for r in evals
                   if (r["eval_windows"] == most) == full]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color="C1" if not full else "C3",
                        label=f"{label}: {pts[-1][1]:.3f}")
    ax.set_xlabel("wall-clock minutes (compile and evals included)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- train


# Steps between two checks that every process agrees on (a stop signal, process 0's clock):
# each check is an allgather, so not every step; one process alone checks every step.
AGREE_EVERY = 8


class Trainer:
    """One training run, in the order a reader follows it: `__init__` sets up (data, model,
    state, the compiled step and eval), `step` dispatches one optimizer step, `evaluate`,
    `save`, and `finish` (final eval, checkpoint, sample, summary). `run` is the loop.

    The host never waits on the device inside the loop: step n's metrics (loss, gradient
    norm) are read after step n+1 is dispatched, so the device is never idle while the host
    logs; evals, saves and the end read everything first (a save never holds a step whose
    loss was not checked)."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True):
        self.t_start = time.perf_counter()
        sharding.initialize_distributed()
        self.main_process = jax.process_index() == 0
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.progress = progress

        self.data_dir = resolve_data(cfg)
        self.data_meta = json.loads((self.data_dir / "meta.json").read_text())
        self.train_tokens = data_lib.load_split(self.data_dir, "train")
        self.val_tokens = data_lib.load_split(self.data_dir, "val")

        model_config, params = initial_params(cfg)
        cfg, adapters = initial_adapters(cfg.replace(model=model_config), model_config)
        self.cfg, self.model_config = cfg, model_config
        self.lora_config = cfg.lora_config()
        self.frozen, self.lora_meta = (), {}
        if adapters is not None:  # params become the frozen base (float or int8)
            base, params = params, adapters.tree
            self.lora_meta = {"lora": {"config": self.lora_config.to_dict(), "base": {
                "source": sources.source_reference(cfg.init_from),
                "sha256": sources.fingerprint(base)}}}
        K, B, T = cfg.grad_accum, cfg.batch_size, model_config.block_size
        self.sampler = data_lib.BatchSampler(self.train_tokens, B, T, cfg.seed)
        mesh = sharding.make_mesh(cfg.mesh_data)
        self.schedule = optim.LRSchedule(cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        optimizer = optim.optimizer_for(cfg)
        init = lambda p: step_lib.init_state(p, optimizer, cfg.seed)
        state_sh = sharding.state_shardings(jax.eval_shape(init, params), mesh, cfg.fsdp)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            jax.eval_shape(init, params), state_sh,
        )
        frozen_sh = ()
        if self.lora_config is not None:
            frozen_sh = (sharding.state_shardings(base, mesh, cfg.fsdp),)
            self.frozen = (jax.device_put(base, frozen_sh[0]),)
            del base
        self.trainable_count = sum(x.size for x in jax.tree.leaves(params))

        self.checkpoints = ckpt_lib.Checkpointer(self.out / "checkpoints",
                                                 keep=cfg.keep_checkpoints)
        self.losses: list[float] = []
        self.clock = {"before_s": 0.0, "warmup_end_s": None}  # time of earlier processes
        if cfg.resume:
            self.state, meta = _restore(self.checkpoints, abstract, cfg, self.data_dir,
                                        self.data_meta, self.lora_meta)
            self.clock = {"before_s": meta["elapsed_s"], "warmup_end_s": meta["warmup_end_s"]}
            if self.main_process:
                self.losses = _truncate_metrics(self.metrics_path, int(self.state["step"]))
        else:
            self.state = jax.jit(init, out_shardings=state_sh)(params)
            if self.main_process:
                self.metrics_path.write_text("")
        del params
        self.step_count = int(self.state["step"])

        self.x_sh = sharding.batch_sharding(mesh, 3, batch_axis=1)  # [K, B, T]
        self.x_rows = sharding.process_rows(self.x_sh, (K, B, T))
        self.b_sh = sharding.batch_sharding(mesh, 2)  # [B, T]
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.train_step = jax.jit(
            step_lib.make_train_step(model_config, optimizer, self.lora_config),
            in_shardings=(state_sh, self.x_sh, self.x_sh, replicated, *frozen_sh),
            out_shardings=(state_sh, replicated), donate_argnums=0,
        )
        self.eval_fn = jax.jit(
            step_lib.make_eval_step(model_config, self.lora_config),
            in_shardings=(state_sh["params"], self.b_sh, self.b_sh,
                          sharding.batch_sharding(mesh, 1), *frozen_sh),
            out_shardings=(replicated, replicated),
        )
        self.peak = (cfg.peak_flops or perf.measure_peak_flops(model_config.dtype)) * mesh.size
        self.flops_per_token = perf.flops_per_token(model_config)
        self.full_eval_batches = -(-((len(self.val_tokens) - 1) // T) // B)
        # What the ending costs (full eval, save, sample), measured as the run goes, so a
        # time budget is met with everything included; sampling compiles a decoder: ~15 s.
        self.ending = {"eval_s": 0.0, "save_s": 0.0,
                       "sample_s": 15.0 if cfg.sample_tokens else 0.0}
        self.budget = None if cfg.max_minutes is None else cfg.max_minutes * 60
        self.tok_s = self.mfu = 0.0
        self.window = None  # (start time, steps) of the throughput window
        self.pending = None  # (step, lr, metrics) of the dispatched step not yet read
        self.on_record: Callable[[int, dict], None] | None = None
        self.agree_every = 1 if jax.process_count() == 1 else AGREE_EVERY

    # ------------------------------------------------------------------------ clock, log

    def elapsed(self) -> float:
        return self.clock["before_s"] + time.perf_counter() - self.t_start

    def time_fraction(self) -> float:
        if self.budget is None or self.clock["warmup_end_s"] is None:
            return 0.0
        start = self.clock["warmup_end_s"]
        return (self.elapsed() - start) / max(self.budget - sum(self.ending.values()) - start,
                                              1e-9)

    def log(self, record: dict) -> None:
        if self.main_process:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------ the pieces

    def step(self, lr: float) -> None:
        """Dispatch one optimizer step at learning rate lr; its metrics are read later."""
        K, B, T = self.cfg.grad_accum, self.cfg.batch_size, self.model_config.block_size
        x, y = self.sampler.batch(self.step_count, (K, B), self.x_rows)
        put = jax.make_array_from_process_local_data
        self.state, metrics = self.train_step(self.state, put(self.x_sh, x, (K, B, T)),
                                              put(self.x_sh, y, (K, B, T)), np.float32(lr),
                                              *self.frozen)
        self.step_count += 1
        previous, self.pending = self.pending, (self.step_count, lr, metrics)
        if previous is not None:
            self._record(*previous)

    def read_metrics(self) -> None:
        """Wait for the dispatched step and record it (before an eval, a save, the end)."""
        if self.pending is not None:
            previous, self.pending = self.pending, None
            self._record(*previous)

    def _restart_window(self) -> None:
        """Evals and saves are not training throughput: the window starts again after them."""
        if self.window is not None:
            self.window = (time.perf_counter(), 0)

    def _record(self, step: int, lr: float, metrics: dict) -> None:
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = self.checkpoints.steps()
            raise NonFiniteLossError(
                f"step {step}: loss {loss}, gradient norm {grad_norm}. Stopped; the last good "
                f"checkpoint is "
                f"{f'step {last[-1]} in {self.checkpoints.directory}' if last else 'none'}. "
                f"Lower --lr (now {self.cfg.lr}), raise --warmup-steps (now "
                f"{self.cfg.warmup_steps}) or train in float32, then --resume")
        now = time.perf_counter()
        if self.window is None:  # the first step compiled: measure from its end
            self.window = (now, 0)
        else:
            start, steps = self.window[0], self.window[1] + 1
            self.window = (start, steps)
            if now - start > 2.0:
                self.tok_s = steps * self.cfg.tokens_per_step / (now - start)
                self.mfu = self.tok_s * self.flops_per_token / self.peak
                self.window = (now, 0)
                if not self.ending["eval_s"]:  # until measured: forward ~ 1/3 of a step
                    B, T = self.cfg.batch_size, self.model_config.block_size
                    self.ending["eval_s"] = self.full_eval_batches * B * T / self.tok_s / 3
        self.losses.append(loss)
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tok_s": round(self.tok_s, 1), "mfu": round(self.mfu, 4),
                  "time_s": round(self.elapsed(), 3)}
        self.log(record)
        if self.on_record is not None:
            self.on_record(step, record)

    def evaluate(self, max_batches=None) -> tuple[float, float]:
        """(val loss, the seconds a full eval would take at this pace)."""
        self.read_metrics()
        t = time.perf_counter()
        loss = evaluate(self.eval_fn, self.state["params"], self.val_tokens, self.cfg,
                        self.b_sh, max_batches, self.frozen)
        n = min(max_batches or self.full_eval_batches, self.full_eval_batches)
        self.log({"step": self.step_count, "val_loss": loss, "time_s": round(self.elapsed(), 3),
                  "eval_windows": n * self.cfg.batch_size})
        self._restart_window()
        return loss, (time.perf_counter() - t) * self.full_eval_batches / n

    def save(self) -> float:
        """Checkpoint the state at the current step; the seconds it took."""
        self.read_metrics()
        t = time.perf_counter()
        self.checkpoints.save(self.step_count, self.state, config=self.model_config, extra={
            "train_config": self.cfg.to_dict(), "sampler": self.sampler.state(self.step_count),
            "data_sha256": self.data_meta["source_sha256"], "elapsed_s": self.elapsed(),
            "warmup_end_s": self.clock["warmup_end_s"], **self.lora_meta,
        })
        self._restart_window()
        return time.perf_counter() - t

    # ------------------------------------------------------------------------ the loop

    def run(self, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
        cfg = self.cfg
        self.on_record = on_step
        stopped = "max_steps"
        postfix = {}
        bar = tqdm(total=cfg.max_steps, initial=self.step_count, desc="train",
                   disable=not (self.progress and self.main_process), dynamic_ncols=True)
        say = bar.write if self.main_process else lambda _: None
        if self.progress:
            say(describe(cfg))
        fraction, first = 0.0, True
        with _StopFlag() as stop:
            while self.step_count < cfg.max_steps:
                step = self.step_count
                if step == cfg.warmup_steps and self.clock["warmup_end_s"] is None:
                    self.clock["warmup_end_s"] = self.elapsed()
                if first or step % self.agree_every == 0:
                    first = False
                    signalled, fraction = _agree(stop.signal, self.time_fraction())
                    if signalled:
                        stopped = "signal"
                        say(f"{stop.signal or 'a signal to another process'}: saving step "
                            f"{step} and exiting")
                        break
                    if fraction >= 1.0:
                        stopped = "time"
                        break
                self.step(self.schedule(step, fraction))
                if fraction > 0:  # a time budget: show the steps it will end at
                    bar.total = min(cfg.max_steps, int(
                        cfg.warmup_steps + (step + 1 - cfg.warmup_steps) / min(fraction, 1.0)))
                if self.losses:
                    postfix.update(loss=f"{self.losses[-1]:.3f}", tok_s=f"{self.tok_s:.0f}",
                                   mfu=f"{self.mfu:.1%}")
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if self.step_count % cfg.eval_every == 0 and self.step_count < cfg.max_steps:
                    val, self.ending["eval_s"] = self.evaluate(cfg.eval_batches or None)
                    postfix["val"] = f"{val:.3f}"
                    say(f"step {self.step_count}: val loss {val:.4f} "
                        f"({self.elapsed() / 60:.1f} min)")
                if self.step_count % cfg.ckpt_every == 0:
                    self.ending["save_s"] = self.save()
            self.read_metrics()
        bar.close()
        if stopped == "time":
            say(f"time budget of {cfg.max_minutes} min: training ended at step "
                f"{self.step_count}")
        return self.finish(stopped)

    def finish(self, stopped: str) -> TrainResult:
        """Final eval (unless signalled), the last checkpoint, a sample and summary.json."""
        cfg, model_config = self.cfg, self.model_config
        val_loss = sample = None
        if stopped != "signal":
            val_loss, _ = self.evaluate(cfg.final_eval_batches or None)
        self.save()
        self.checkpoints.close()
        if stopped != "signal" and cfg.sample_tokens > 0:
            # Gathering the (possibly FSDP-sharded) params takes every process; sampling, one.
            params = multihost_utils.process_allgather(self.state["params"], tiled=True)
            if self.lora_config is not None:  # the merged model, as `sample --ckpt` runs
                base = multihost_utils.process_allgather(self.frozen[0], tiled=True)
                params = lora_lib.merge(
                    base, lora_lib.Adapters(params, self.lora_config, model_config),
                    requantize=True)
            if self.main_process:
                prompt = sample_prompt(self.train_tokens, min(16, model_config.block_size // 2))
                sample = sample_text(params, model_config, cfg, prompt)
        result = TrainResult(
            config=cfg, step=self.step_count, stopped=stopped, losses=self.losses,
            val_loss=val_loss, wall_s=time.perf_counter() - self.t_start,
            elapsed_s=self.elapsed(), tokens_per_s=self.tok_s, mfu=self.mfu, sample=sample,
            out=self.out,
        )
        if self.main_process:
            plot_curves(self.metrics_path, self.out / "loss_curve.png")
            summary = {k: v for k, v in dataclasses.asdict(result).items()
                       if k not in ("losses", "config")}
            summary.update(
                config=cfg.to_dict(), out=str(self.out), machine=perf.machine(),
                peak_flops=self.peak, flops_per_token=self.flops_per_token,
                trainable_params=self.trainable_count,
                frozen_base_bytes=int8.nbytes(self.frozen[0]) if self.frozen else None,
                final_train_loss=self.losses[-1] if self.losses else None)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return result


def train(cfg: TrainConfig, *, on_step: Callable[[int, dict], None] | None = None,
          progress: bool = True) -> TrainResult:
    """Run (or resume) the training `cfg` describes; see the module docstring for outputs.

    With cfg.max_minutes the learning-rate cosine follows wall-clock time too, so the run
    ends annealed when the budget (final eval and sample included) is spent, however fast
    this machine is today; without it everything depends on the step alone, and a resumed
    run is bit-for-bit the run that was never interrupted.

    With cfg.lora_rank > 0 the run fine-tunes LoRA adapters over the frozen --init-from
    model: the adapters are the train state's params (the only tree that gets gradients,
    optimizer state and checkpoints); the base is an argument of every step, never updated,
    and checkpoints refer to it by source and sha256.

    on_step(step, metrics) runs once each step's metrics are read (eval programs, tests):
    step n's, after step n+1 was dispatched."""
    return Trainer(cfg, progress=progress).run(on_step)


def _restore(checkpoints, abstract, cfg: TrainConfig, data_dir, data_meta, lora_meta):
    """(state, meta) to resume from, after checking the run would continue unchanged."""

    def same_trajectory(meta):
        diff = TrainConfig.from_dict(meta["train_config"]).trajectory_diff(cfg)
        if diff:
            raise ckpt_lib.CheckpointMismatchError(
                f"--resume with settings that change the run (checkpoint vs now): "
                f"{'; '.join(diff)}. Pass the checkpoint's values or start a new --out"
            )

    restored = checkpoints.restore(abstract, config=cfg.model, check_meta=same_trajectory)
    if restored is None:
        raise FileNotFoundError(
            f"--resume: no checkpoint in {checkpoints.directory}; drop --resume to start "
            f"afresh or point --out at the run to continue"
        )
    state, meta = restored
    if meta["data_sha256"] != data_meta["source_sha256"]:
        raise ckpt_lib.CheckpointMismatchError(
            f"--resume on other data: the checkpoint was trained on source sha256 "
            f"{meta['data_sha256']}, {data_dir} holds {data_meta['source_sha256']}"
        )
    if lora_meta and meta["lora"]["base"]["sha256"] != lora_meta["lora"]["base"]["sha256"]:
        raise ckpt_lib.CheckpointMismatchError(
            f"--resume over another base: the adapters were trained on "
            f"{meta['lora']['base']['source']} (sha256 {meta['lora']['base']['sha256'][:12]}...), "
            f"--init-from {cfg.init_from} has sha256 {lora_meta['lora']['base']['sha256'][:12]}..."
        )
    return state, meta
