"""`TrainConfig`: one frozen dataclass for a training run, and the named recipes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from gpt2jax.config import GPTConfig
from gpt2jax.lora import LoRAConfig
from train import optim

# Fields that change the sequence of updates: a resumed run must match the checkpoint's.
# (init_from is not one: a LoRA base is checked by its sha256, wherever it now lies.)
TRAJECTORY_FIELDS = (
    "model", "seed", "batch_size", "grad_accum", "max_steps", "lr", "min_lr",
    "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "optimizer", "muon_lr",
    "muon_momentum", "lora_rank",
    "lora_alpha", "rslora", "lora_targets", "lora_dropout",
)
MUON_FIELDS = ("muon_lr", "muon_momentum")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: GPTConfig = dataclasses.field(default_factory=GPTConfig)
    data: str = "shakespeare"  # a prepared folder, or text for train.data.prepare (file,
    #                            folder of .txt, dataset name); text is prepared into out/data
    out: str = "out/shakespeare"
    seed: int = 0
    batch_size: int = 16  # rows per micro-batch, global (split over the 'data' mesh axis)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine floor
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    optimizer: str = "adamw"  # or "muon": Muon for the blocks' kernels, AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak lr (follows the schedule's shape); the rest use lr
    muon_momentum: float = 0.95  # Muon's Nesterov momentum (modded-nanogpt's and optax's)
    eval_every: int = 250
    eval_batches: int = 0  # batches per periodic eval; 0 = the whole val split
    final_eval_batches: int = 0  # batches of the final eval; 0 = the whole val split (smoke
    # runs of the experiments cap it: a toy model's eval is mostly its 50257-way head)
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    max_minutes: float | None = None  # wall-clock budget of the whole run, final eval included
    resume: bool = False
    init_from: str | None = None  # hf:DIR | gpt2 (or another hub name) | ckpt:DIR
    lora_rank: int = 0  # > 0: train rank-r adapters over the frozen init_from model
    lora_alpha: float = 16.0
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r
    lora_targets: tuple[str, ...] = ("c_attn.qv",)
    lora_dropout: float = 0.0  # on the adapters' input, training only (as peft)
    lora_from: str | None = None  # a peft adapter folder to continue (sets the lora_ fields)
    mesh_data: int = 1  # devices on the 'data' axis
    fsdp: bool = False  # shard params and optimizer state over 'data' too
    peak_flops: float | None = None  # per device, for MFU; measured with a matmul when None
    sample_tokens: int = 200  # tokens sampled at the end (0: none)
    temperature: float = 0.8
    top_k: int | None = 200

    def __post_init__(self):
        positive = ("batch_size", "grad_accum", "max_steps", "eval_every", "ckpt_every",
                    "keep_checkpoints", "mesh_data")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r} must be a positive integer")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps})"
            )
        optim.check_optimizer(self.optimizer, self.lr, self.muon_lr, self.muon_momentum)
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.batch_size % self.mesh_data:
            raise ValueError(
                f"batch_size={self.batch_size} does not split over mesh data={self.mesh_data} "
                f"devices: use a multiple of {self.mesh_data}"
            )
        for name in ("eval_batches", "final_eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name}={value!r} must be 0 (the whole val "
                                 f"split) or a positive integer")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes={self.max_minutes} must be > 0")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # JSON gives lists
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank!r} must be 0 (off) or a positive int")
        if self.lora_rank:
            self.lora_config()  # validates alpha and targets
            if self.init_from is None:
                raise ValueError(
                    f"lora_rank={self.lora_rank} needs a base model to adapt: pass --init-from "
                    f"ckpt:DIR, hf:DIR or gpt2"
                )
        if self.lora_from is not None and self.init_from is None:
            raise ValueError(
                f"lora_from={self.lora_from!r} needs the base model the adapters were trained "
                f"on: pass --init-from hf:DIR, ckpt:DIR or gpt2"
            )

    def lora_config(self) -> LoRAConfig | None:
        """The adapters' config, or None for full training."""
        if not self.lora_rank:
            return None
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha,
                          targets=self.lora_targets, rslora=self.rslora,
                          dropout=self.lora_dropout)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.model.block_size

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return cls(**{**d, "model": GPTConfig.from_dict(d["model"])})

    def trajectory_diff(self, other: TrainConfig) -> list[str]:
        """'field: a vs b' for every trajectory field where self and other differ (Muon's
        settings only where a run uses Muon: an AdamW run never reads them)."""
        unused = () if "muon" in (self.optimizer, other.optimizer) else MUON_FIELDS
        return [
            f"{f}: {getattr(self, f)!r} vs {getattr(other, f)!r}"
            for f in TRAJECTORY_FIELDS
            if f not in unused and getattr(self, f) != getattr(other, f)
        ]


# The main job: Tiny Shakespeare on a 2-core CPU, as low a val loss as 15 minutes allow, all
# included. Chosen by runs of the clock (docs/design.md#main-job): dropout 0 beat 0.1
# and 0.2, lr 2e-3 beat 1e-3 and 3e-3; RoPE beat learned positions (claims report: -0.235
# nats at equal tokens), and in 5-minute runs with RoPE, 4 rows of 256 tokens (5.108) beat 8
# of 128 (5.113), 2 of 256 (5.186), 6 layers (5.250) and lr 3e-3 (5.257). The cosine follows
# the clock, so a slower (busier) machine gets fewer steps, still annealed.
PRESETS: dict[str, TrainConfig] = {
    "shakespeare": TrainConfig(
        model=GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256, dropout=0.0,
                        pos_embedding="rope"),
        data="shakespeare",
        out="out/shakespeare",
        batch_size=4,
        max_steps=100_000,  # an upper bound: the time budget ends the run
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=100,
        eval_every=200,
        eval_batches=16,  # 128 of the 264 val windows, spread evenly; the last eval has all
        ckpt_every=500,
        max_minutes=14.5,  # the whole train() call; leaves ~20 s for start-up and exit
    ),
}


def platform_dtype(platform: str) -> str:
    """The compute dtype `python -m train` picks when --dtype is not given: bfloat16 on an
    accelerator ('gpu', 'tpu'), float32 on 'cpu' (exact, and what the presets were tuned in).
    Resolved in the CLI, not in GPTConfig, so a config means the same numbers everywhere."""
    return "float32" if platform == "cpu" else "bfloat16"


def describe(cfg: TrainConfig) -> str:
    """One line naming the run's recipe choices; every run prints it first."""
    m = cfg.model
    optimizer = (f"Muon (lr {cfg.muon_lr:g}, momentum {cfg.muon_momentum:g}) + AdamW"
                 if cfg.optimizer == "muon" else "AdamW")
    budget = (f"{cfg.max_minutes:g}-minute budget" if cfg.max_minutes
              else f"{cfg.max_steps} steps")
    return (f"recipe: {m.n_layer} layers x {m.n_embd} dims, {m.n_head} heads, "
            f"{m.pos_embedding} positions, {m.norm_placement}-{m.norm}, "
            f"{'tied' if m.tie_embeddings else 'untied'} head, dropout {m.dropout:g}, {m.dtype}; "
            f"{cfg.batch_size * cfg.grad_accum} x {m.block_size} tokens per step, {optimizer}, "
            f"lr {cfg.lr:g} -> {cfg.min_lr:g} (warmup {cfg.warmup_steps}), {budget}")


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown train preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
