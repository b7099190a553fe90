"""Train-state checkpoints with orbax: atomic, last-K, checked on the way back in.

Orbax and tree checks only: where a model comes from (a checkpoint, a Hugging Face folder, a
LoRA fine-tune over its base) is `gpt2jax.sources`.

One checkpoint is a step folder with three orbax items:

    params   the model's param tree            (all that `load` needs)
    train    the rest of the state: step, optimizer state, PRNG key
    meta     JSON: the GPTConfig, the step, and whatever the trainer adds (its own config,
             the batch sampler's state, elapsed time)

A LoRA fine-tune's checkpoint holds the adapters as its 'params' (the trainable partition)
and, in meta["lora"], the LoRAConfig and a reference to the frozen base: where it came from
(`load_model`'s source string) and the sha256 of its arrays, checked when it is read back.

Orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save leaves no step folder that looks finished. A step folder that is damaged anyway
(disk trouble, a copy cut short) is skipped with a warning and the previous one is used
(in a multi-process run it is an error instead: no process can know what the others read).

Several processes save and restore together (orbax's multi-process support, on a folder they
all see): each writes and reads only the shards its devices hold, and what one process count
wrote another restores, since the arrays are stored whole and resharded on the way in.
Restores are checked leaf by leaf against the tree the caller expects, because orbax can
fill a partial or differently shaped target without complaint.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from gpt2jax.config import GPTConfig

FORMAT = 2  # 1: the blocks stacked on a leading axis under `h`, read and converted
_LAYER_PATH = re.compile(r"(.*/)?h/(\d+)/(.*)")
_MAX_LISTED = 8
_WHERE = "pass the --out folder of a gpt2jax training run, or its checkpoints/ folder"


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that belongs to a different model or train state."""


# What damaged files raise from orbax and tensorstore (a file cut short: json's ValueError;
# a missing one: OSError). Only these move a step aside; any other error propagates and
# leaves the step where it is.
DAMAGE_ERRORS = (OSError, ValueError, EOFError)


# ---------------------------------------------------------------------------- tree checks


def path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


def tree_signature(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{'opt_state/1/0/mu/wte/embedding': (shape, dtype), ...} for every array leaf.

    Named tuples and lists both print as indices/field names, so an optax state and the
    dicts/lists orbax's metadata uses for it give the same paths."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): (tuple(leaf.shape), str(leaf.dtype)) for p, leaf in leaves}


def check_tree(actual, expected, what: str) -> None:
    """Raise CheckpointMismatchError naming the leaves whose presence, shape or dtype differ."""
    got, want = tree_signature(actual), tree_signature(expected)
    problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    problems += [
        f"{k}: {got[k][1]}{list(got[k][0])} instead of {want[k][1]}{list(want[k][0])}"
        for k in sorted(set(got) & set(want)) if got[k] != want[k]
    ]
    if problems:
        more = f" (+{len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise CheckpointMismatchError(
            f"{what} does not match the expected tree: {'; '.join(problems[:_MAX_LISTED])}{more}"
        )


def check_config(saved: dict, config: GPTConfig, where: str) -> None:
    """Raise CheckpointMismatchError listing the GPTConfig fields that differ."""
    theirs = GPTConfig.from_dict(saved)
    if theirs == config:
        return
    diffs = [
        f"{k}={v!r} (checkpoint) vs {getattr(config, k)!r} (this run)"
        for k, v in theirs.to_dict().items() if getattr(config, k) != v
    ]
    raise CheckpointMismatchError(
        f"{where} was written for another model config: {', '.join(diffs)}. Resume with the "
        f"checkpoint's settings, or write to a new --out folder"
    )


def _from_stacked(stacked_tree, expected):
    """A format-1 tree (blocks stacked under `h`, `h/attn/...` [L, ...]) in the structure of
    `expected` (`h/i/attn/...`), each leaf put where `expected`'s ShapeDtypeStruct says."""
    stacked = {path_str(p): leaf
               for p, leaf in jax.tree_util.tree_flatten_with_path(stacked_tree)[0]}
    wanted, treedef = jax.tree_util.tree_flatten_with_path(expected)
    leaves, missing = [], []
    for path, want in wanted:
        key = path_str(path)
        layer = _LAYER_PATH.fullmatch(key)
        old_key = f"{layer[1] or ''}h/{layer[3]}" if layer else key
        if old_key not in stacked:
            missing.append(old_key)
            continue
        leaf = np.asarray(stacked[old_key])
        leaf = leaf[int(layer[2])] if layer and leaf.ndim == len(want.shape) + 1 else leaf
        leaves.append(jax.device_put(leaf, getattr(want, "sharding", None)))
    if missing:
        raise CheckpointMismatchError(
            f"a format-1 checkpoint lacks {', '.join(missing[:_MAX_LISTED])}: it was written "
            f"for another model or train state")
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _abstract_on(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


# ---------------------------------------------------------------------------- manager


class Checkpointer:
    """Saves and restores {'params', ...rest of the train state} plus JSON metadata."""

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint folder {self.directory} does not exist: {_WHERE}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # Synchronous: a step returned from save() is on disk, so a kill right after
            # loses nothing, and no writer thread competes with training for the cores.
            enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only,  # leftovers of saves cut short
            read_only=read_only,
            create=not read_only,
        )
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "train": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: dict, *, config: GPTConfig, extra: dict | None = None):
        """Write `state` (a dict with a 'params' entry) at `step`; no-op if it exists."""
        if step in self._manager.all_steps():
            return
        params = state["params"]
        rest = {k: v for k, v in state.items() if k != "params"}
        meta = {"format": FORMAT, "step": step, "config": config.to_dict(), **(extra or {})}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                train=ocp.args.StandardSave(rest),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore(self, abstract_state: dict, *, config: GPTConfig,
                check_meta: Callable[[dict], None] | None = None) -> tuple[dict, dict] | None:
        """(state, meta) of the newest readable checkpoint, or None when there is none.

        `abstract_state` is the expected tree of ShapeDtypeStructs (with the shardings to
        restore onto). A damaged newest checkpoint is moved to `corrupted/` with a warning
        and the one before it is used; another config raises CheckpointMismatchError, as
        does `check_meta(meta)` (the caller's own test of the meta), both before any array
        is read, so the message names the settings rather than the tree they change."""

        def read(step, meta):
            check_config(meta["config"], config, f"checkpoint {self.directory}/{step}")
            if check_meta is not None:
                check_meta(meta)
            params_abs = abstract_state["params"]
            rest_abs = {k: v for k, v in abstract_state.items() if k != "params"}
            where = f"checkpoint {self.directory}/{step}"
            if meta.get("format", 1) == 1:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(), train=ocp.args.StandardRestore()))
                state = _from_stacked({"params": restored["params"], **restored["train"]},
                                      abstract_state)
                check_tree(state, abstract_state, f"restored {where}")
                return state, meta
            on_disk = self._manager.item_metadata(step)
            check_tree(on_disk["params"].tree, params_abs, f"{where} params")
            check_tree(on_disk["train"].tree, rest_abs, f"{where} train state")
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(params_abs),
                    train=ocp.args.StandardRestore(rest_abs),
                ),
            )
            state = {"params": restored["params"], **restored["train"]}
            check_tree(state, abstract_state, f"restored {where}")
            return state, meta

        return self._newest_readable(read, quarantine=True)

    def load_params(self) -> tuple[GPTConfig, dict]:
        """(config, params) of the newest readable checkpoint, params on the default device.
        A LoRA checkpoint holds adapters, not a model: `gpt2jax.sources.load_checkpoint`
        merges them into their base."""
        from gpt2jax.model import init_params  # model sits below checkpoint; import when used
        from gpt2jax.quant import int8

        def read(step, meta):
            if "lora" in meta:
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory}/{step} holds LoRA adapters, not a model: read "
                    f"it with gpt2jax.sources.load_checkpoint (merged into its base) or "
                    f"gpt2jax.checkpoint.load_adapters")
            config = GPTConfig.from_dict(meta["config"])
            expected = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
            if "int8" in meta:  # written by `python -m gpt2jax.quantize`
                options = int8.options(meta["int8"])
                expected = jax.eval_shape(lambda p: int8.quantize(p, **options), expected)
            return config, self._restore_params_item(step, expected, "params",
                                                     stacked=meta.get("format", 1) == 1)

        found = self._newest_readable(read, quarantine=False)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}: {_WHERE}")
        return found

    def holds_adapters(self) -> bool:
        """Whether the newest readable checkpoint is a LoRA fine-tune's (adapters only)."""
        found = self._newest_readable(lambda step, meta: "lora" in meta, quarantine=False)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}: {_WHERE}")
        return found

    def load_adapters(self):
        """(Adapters, base reference {'source', 'sha256'}) of the newest LoRA checkpoint."""

        def read(step, meta):
            if "lora" not in meta:
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory}/{step} holds a full model, not LoRA adapters: "
                    f"read it with gpt2jax.checkpoint.load"
                )
            config = GPTConfig.from_dict(meta["config"])
            return self._restore_adapters(step, meta, config), meta["lora"]["base"]

        found = self._newest_readable(read, quarantine=False)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}: {_WHERE}")
        return found

    def _restore_adapters(self, step: int, meta: dict, config: GPTConfig):
        from gpt2jax import lora

        lora_config = lora.LoRAConfig.from_dict(meta["lora"]["config"])
        expected = jax.eval_shape(lambda: lora.init(lora_config, config, jax.random.PRNGKey(0)))
        tree = self._restore_params_item(step, expected.tree, "adapters")  # stacked in both formats
        return lora.Adapters(tree=tree, config=lora_config, base=config)

    def _restore_params_item(self, step: int, expected_tree, what: str, stacked: bool = False):
        """The 'params' item of `step` onto the default device, checked leaf by leaf against
        `expected_tree` (shapes) before and after reading; `stacked`: a format-1 item."""
        # this process's first device: every process of a multi-process run reads the whole
        # item (--init-from), and jax.devices()[0] belongs to process 0
        device = jax.local_devices()[0]
        expected = _abstract_on(expected_tree, jax.sharding.SingleDeviceSharding(device))
        where = f"checkpoint {self.directory}/{step} {what}"
        if stacked:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
            restored = _from_stacked(restored, expected)
            check_tree(restored, expected, where)
            return restored
        check_tree(self._manager.item_metadata(step)["params"].tree, expected, where)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(expected))
        )["params"]
        check_tree(restored, expected, where)
        return restored

    def _newest_readable(self, read: Callable, *, quarantine: bool):
        steps = sorted(self._manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                meta = self.read_meta(step)
                return read(step, meta)
            except CheckpointMismatchError:
                raise
            except DAMAGE_ERRORS as e:  # anything else is not the files' fault: it propagates
                if jax.process_count() > 1:  # each process reads its own shards: a fallback
                    raise FileNotFoundError(  # would need them all to agree, so none is taken
                        f"checkpoint {self.directory}/{step} is unreadable in process "
                        f"{jax.process_index()} ({type(e).__name__}: {str(e)[:200]}): move it "
                        f"aside and resume again"
                    ) from e
                nxt = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "none left"
                warnings.warn(
                    f"checkpoint {self.directory}/{step} is unreadable "
                    f"({type(e).__name__}: {str(e)[:200]}); {nxt}",
                    stacklevel=3,
                )
                if quarantine:
                    self._quarantine(step)
        if steps:
            raise FileNotFoundError(
                f"no readable checkpoint in {self.directory} (tried steps {steps}); start "
                f"afresh without --resume or in a new --out folder"
            )
        return None

    def _quarantine(self, step: int) -> None:
        """Move a damaged step aside (out of orbax's sight) so a later save can reuse it."""
        dest = self.directory / "corrupted" / f"{step}-{int(time.time())}"
        dest.parent.mkdir(exist_ok=True)
        shutil.move(str(self.directory / str(step)), dest)
        self._manager.reload()

    def close(self) -> None:
        self._manager.close()


def _reader(directory: str | os.PathLike) -> Checkpointer:
    directory = Path(directory)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    return Checkpointer(directory, keep=None, read_only=True)


def load(directory: str | os.PathLike) -> tuple[GPTConfig, dict]:
    """(config, params) from the newest readable model checkpoint. `directory` is a
    checkpoint folder or a training run's folder holding one in `checkpoints/`. For any
    checkpoint, LoRA fine-tunes included, use `gpt2jax.sources.load_checkpoint`."""
    ckpt = _reader(directory)
    try:
        return ckpt.load_params()
    finally:
        ckpt.close()


def holds_adapters(directory: str | os.PathLike) -> bool:
    """Whether the newest readable checkpoint in `directory` is a LoRA fine-tune's."""
    ckpt = _reader(directory)
    try:
        return ckpt.holds_adapters()
    finally:
        ckpt.close()


def load_adapters(directory: str | os.PathLike):
    """(Adapters, base reference) of a LoRA fine-tune's newest checkpoint, unmerged (to
    export with `lora.save_peft`, or to measure)."""
    ckpt = _reader(directory)
    try:
        return ckpt.load_adapters()
    finally:
        ckpt.close()


def save_params(directory: str | os.PathLike, config: GPTConfig, params, *,
                extra: dict | None = None) -> Path:
    """A params-only checkpoint (step 0) that `load` reads: exports, quantized copies."""
    ckpt = Checkpointer(directory, keep=None)
    try:
        # orbax refuses an empty item: the 'train' part holds just the step
        ckpt.save(0, {"params": params, "step": np.zeros((), np.int32)}, config=config,
                  extra=extra)
    finally:
        ckpt.close()
    return Path(directory)
