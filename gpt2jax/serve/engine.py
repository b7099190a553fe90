"""The serving engine: a fixed number of cache slots advanced together (continuous batching).

Device side, JetStream's shape (three jitted functions, each compiled once per shape):

    prefill(params, tokens_1P, ...)  one request's prompt, right-padded to a bucket P, through
                                     the model into a one-row cache of the slots' context;
                                     returns that cache and the first new token
    insert(state, one, slot, ...)    that row copied into slot `slot` of the slots' cache, with
                                     the request's sampling settings (slot is traced)
    step(params, state, rows)        `steps_per_call` decode steps of the first `rows` slots
                                     in one `lax.scan` (rows: a power of two past the highest
                                     live slot); tokens [rows, k] and which were emitted

Every per-request setting (temperature, top-k, top-p, seed, max tokens, stop ids) is a traced
array of the slot state, so no mix of requests compiles anything new after warm-up.

Host side, `Engine` runs one thread: between steps it frees finished or cancelled slots and
prefills waiting requests into the lowest free ones (so live slots stay packed and a step
computes few rows at low load); each request's tokens go to its own callback.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gpt2jax.cache import check_cache_kind, make_cache
from gpt2jax.config import GPTConfig
from gpt2jax.generation import argmax, bucket, inverse_cdf, nucleus_threshold
from gpt2jax.model import apply

MAX_STOP_IDS = 4  # stop token ids per request, as OpenAI allows 4 stop sequences
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests: the caller should retry later."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """One request's settings. top_k 0 and top_p 1 switch those filters off."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: tuple[int, ...] = ()


@dataclasses.dataclass(eq=False)
class Request:
    """A prompt and its settings; `on_token(token_id)` gets each new token (a stop id ends the
    request without being passed on) and `on_finish(reason)` ends it ("length", "stop",
    "cancelled" or "error"), both on the engine's thread."""

    prompt: list[int]
    sampling: Sampling
    on_token: Callable[[int], None]
    on_finish: Callable[[str], None]
    cancelled: bool = False
    generated: int = 0


@struct.dataclass
class SlotState:
    """What the device keeps per slot: the cache (batch = slots), the token to feed next, and
    the request's settings and progress. `key_S2` is each request's raw PRNG key: token n of
    a request is drawn with fold_in(key, n), whatever else is in flight."""

    cache: object
    tok_S: jax.Array
    live_S: jax.Array
    generated_S: jax.Array
    max_new_S: jax.Array
    temperature_S: jax.Array
    top_k_S: jax.Array
    top_p_S: jax.Array
    key_S2: jax.Array
    stop_SK: jax.Array


def top_k_threshold(x_SV, k_S, iters: int = 32):
    """[S, 1] a value t with at least k entries >= t (the k-th largest, to bisection
    precision) per row; -inf where k is 0. Bisection, not a sort: k is traced per row."""
    lo_S1, hi_S1 = x_SV.min(-1, keepdims=True), x_SV.max(-1, keepdims=True)
    k_S1 = k_S[:, None]

    def halve(_, bounds):
        lo_S1, hi_S1 = bounds
        mid_S1 = (lo_S1 + hi_S1) / 2
        ok_S1 = (x_SV >= mid_S1).sum(-1, keepdims=True) >= k_S1
        return jnp.where(ok_S1, mid_S1, lo_S1), jnp.where(ok_S1, hi_S1, mid_S1)

    lo_S1 = jax.lax.fori_loop(0, iters, halve, (lo_S1, hi_S1))[0]
    return jnp.where(k_S1 > 0, lo_S1, -jnp.inf)


def sample_slots(logits_SV, keys_S2, n_S, temperature_S, top_k_S, top_p_S):
    """Next token per slot, each with its own settings and key (fold_in(key, n)): greedy at
    temperature 0, else top-k then top-p filtered sampling. The filters run only when some
    slot asks for them."""
    logits_SV = logits_SV.astype(jnp.float32)
    scaled_SV = logits_SV / jnp.where(temperature_S > 0, temperature_S, 1.0)[:, None]
    scaled_SV = jax.lax.cond(
        jnp.any(top_k_S > 0),
        lambda x: jnp.where(x >= top_k_threshold(x, top_k_S), x, -jnp.inf),
        lambda x: x, scaled_SV)
    probs_SV = jax.nn.softmax(scaled_SV, axis=-1)
    probs_SV = jax.lax.cond(
        jnp.any(top_p_S < 1),
        lambda p: jnp.where(p >= nucleus_threshold(p, top_p_S[:, None]), p, 0.0),
        lambda p: p, probs_SV)
    draw = lambda key_2, n: jax.random.uniform(
        jax.random.fold_in(jax.random.wrap_key_data(key_2), n), (1,))
    u_S1 = jax.vmap(draw)(keys_S2, n_S)
    choice_S = inverse_cdf(probs_SV, u_S1)
    return jnp.where(temperature_S > 0, choice_S, argmax(logits_SV)).astype(jnp.int32)


def _stopped(tok_S, stop_SK):
    return jnp.any(tok_S[:, None] == stop_SK, axis=-1)


class Engine:
    """Slots of one context length over one model; `submit` requests, `start` the thread.

    kv_cache: what the cache stores (`gpt2jax.cache.make_cache`: None, "float32", "bfloat16",
    or a TurboQuantConfig). steps_per_call: decode steps per jitted call (`lax.scan`)."""

    def __init__(self, params, config: GPTConfig, *, slots: int, context: int | None = None,
                 kv_cache=None, steps_per_call: int = 4, max_queue: int = 256):
        context = context or config.block_size
        if slots < 1:
            raise ValueError(f"slots={slots} must be >= 1")
        if config.pos_embedding == "learned" and context > config.block_size:
            raise ValueError(f"context={context} exceeds block_size={config.block_size}, the "
                             f"most learned positions can encode: use --context <= it")
        check_cache_kind(kv_cache, config)
        self.params, self.config, self.slots, self.context = params, config, slots, context
        self.kv_cache, self.steps_per_call, self.max_queue = kv_cache, steps_per_call, max_queue
        self.bytes_per_slot = cache_bytes(config, context, kv_cache)
        self._state = self._empty_state()
        self._by_slot: list[Request | None] = [None] * slots
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.tokens_generated = 0
        self.steps = 0
        self.finished: collections.Counter[str] = collections.Counter()  # requests by reason
        # the engine thread's time by phase, and the rows its steps computed and used: where a
        # served token's time goes (prefill, decode on device, handing tokens out)
        self.seconds: collections.Counter[str] = collections.Counter()
        self.rows_computed = self.rows_live = 0

    # -------------------------------------------------------------- the host side

    @property
    def live(self) -> int:
        return sum(r is not None for r in self._by_slot)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def check(self, prompt: list[int], sampling: Sampling) -> None:
        """Raise ValueError, naming the value and the fix, for a request this engine can't run."""
        if not prompt:
            raise ValueError("the prompt is empty: send at least one token")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, "
                             f"{self.config.vocab_size})")
        if len(prompt) >= self.context:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this model's context is "
                             f"{self.context} tokens: shorten the prompt")
        if sampling.max_tokens < 1:
            raise ValueError(f"max_tokens={sampling.max_tokens} must be >= 1")
        if len(prompt) + sampling.max_tokens > self.context:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens={sampling.max_tokens} is "
                f"{len(prompt) + sampling.max_tokens} tokens, past this model's context of "
                f"{self.context}: ask for at most {self.context - len(prompt)} tokens")
        if len(sampling.stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"{len(sampling.stop_ids)} stop ids; at most {MAX_STOP_IDS}")

    def submit(self, request: Request) -> None:
        """Queue a checked request; QueueFull when `max_queue` are already waiting."""
        self.check(request.prompt, request.sampling)
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request: its slot is freed before the next step."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._run, name="gpt2jax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is in flight and queued, then end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def warm_up(self) -> None:
        """Compile every program a request can reach (each prompt bucket's prefill, insert,
        each row count's step), so that the first requests are not slowed by compiles."""
        for P in self.buckets():
            length = max(1, min(P, self.context - 2))
            self.run_one([0] * length, Sampling(max_tokens=min(2, self.context - length)))
        for rows in self.row_counts():
            self._state = _step(self.params, self._state, config=self.config,
                                steps=self.steps_per_call, rows=rows)[0]
        self._state = self._empty_state()
        self.tokens_generated = self.steps = self.rows_computed = self.rows_live = 0
        self.finished.clear()
        self.seconds.clear()

    def run_one(self, prompt: list[int], sampling: Sampling) -> list[int]:
        """One request, start to end, on the calling thread (for tests and warm-up)."""
        out: list[int] = []
        request = Request(prompt, sampling, out.append, lambda reason: None)
        self.check(prompt, sampling)
        slot = self._admit(request)
        while self._by_slot[slot] is request:
            self._advance()
        return out

    def buckets(self) -> list[int]:
        """The prompt lengths prefill compiles for: powers of two from 16, capped at context."""
        sizes, P = [], bucket(1)
        while P < self.context:
            sizes.append(P)
            P *= 2
        return [*sizes, self.context]

    def row_counts(self) -> list[int]:
        """The row counts a step compiles for: powers of two below the slots, and the slots."""
        return [r for r in (1 << i for i in range(self.slots.bit_length())) if r < self.slots] + [
            self.slots]

    def _rows(self) -> int:
        """The fewest row count that covers every live slot."""
        highest = max(i for i, r in enumerate(self._by_slot) if r is not None)
        return next(r for r in self.row_counts() if r > highest)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self.live or self._stopping or self._cancelled()):
                    self._wake.wait()
                if self._stopping and not (self._waiting or self.live):
                    return
            try:
                self._release_cancelled()
                while self._waiting and None in self._by_slot:
                    request = self._waiting.popleft()
                    if request.cancelled:
                        self.finished["cancelled"] += 1
                        request.on_finish("cancelled")
                    else:
                        self._admit(request)
                if self.live:
                    self._advance()
            except Exception:  # a request must never hang: end everything in flight
                log.exception("engine step failed; ending the requests in flight")
                for slot, request in enumerate(self._by_slot):
                    if request is not None:
                        self._finish(slot, "error")
                self._state = self._empty_state()

    def _cancelled(self) -> bool:
        return any(r is not None and r.cancelled for r in self._by_slot)

    def _release_cancelled(self) -> None:
        release = [r is not None and r.cancelled for r in self._by_slot]
        if any(release):
            self._state = _release(self._state, jnp.asarray(release))
            for slot, gone in enumerate(release):
                if gone:
                    self._finish(slot, "cancelled")

    def _admit(self, request: Request) -> int:
        started = time.perf_counter()
        slot = self._by_slot.index(None)
        s = request.sampling
        P = min(bucket(len(request.prompt)), self.context)
        tokens_1P = np.zeros((1, P), np.int32)
        tokens_1P[0, :len(request.prompt)] = request.prompt
        stop_K = np.full((MAX_STOP_IDS,), -1, np.int32)
        stop_K[:len(s.stop_ids)] = s.stop_ids
        # jax.random.key(seed)'s data, for 64-bit seeds too (without x64 it keeps 32 bits)
        key_2 = np.array([s.seed >> 32, s.seed & 0xFFFFFFFF], np.uint32)
        settings = (jnp.int32(s.max_tokens), jnp.float32(s.temperature), jnp.int32(s.top_k),
                    jnp.float32(s.top_p), jnp.asarray(key_2), jnp.asarray(stop_K))
        one, tok = _prefill(self.params, jnp.asarray(tokens_1P), jnp.int32(len(request.prompt)),
                            settings, config=self.config, context=self.context,
                            kv_cache=self.kv_cache)
        self._state = _insert(self._state, one, jnp.int32(slot), tok, settings)
        self._by_slot[slot] = request
        first = int(tok)
        self.seconds["prefill"] += time.perf_counter() - started
        self._emit(slot, first)
        if s.max_tokens == 1 or first in s.stop_ids:
            self._state = _release(self._state, jnp.arange(self.slots) == slot)
            self._finish(slot, "length" if first not in s.stop_ids else "stop")
        return slot

    def _advance(self) -> None:
        started = time.perf_counter()
        rows = self._rows()
        self._state, toks_RK, emitted_RK, live_R = _step(
            self.params, self._state, config=self.config, steps=self.steps_per_call, rows=rows)
        toks_RK, emitted_RK, live_R = map(np.asarray, (toks_RK, emitted_RK, live_R))
        stepped = time.perf_counter()
        self.seconds["step"] += stepped - started
        self.steps += 1
        self.rows_computed += rows
        self.rows_live += self.live
        for slot, request in enumerate(self._by_slot[:rows]):
            if request is None:
                continue
            emitted = [int(t) for t in toks_RK[slot][emitted_RK[slot]]]
            for tok in emitted:
                self._emit(slot, tok)
            if not live_R[slot]:
                stop = bool(emitted) and emitted[-1] in request.sampling.stop_ids
                self._finish(slot, "stop" if stop else "length")
        self.seconds["hand_out"] += time.perf_counter() - stepped

    def _emit(self, slot: int, tok: int) -> None:
        request = self._by_slot[slot]
        request.generated += 1
        self.tokens_generated += 1
        if tok not in request.sampling.stop_ids:
            request.on_token(tok)

    def _finish(self, slot: int, reason: str) -> None:
        request, self._by_slot[slot] = self._by_slot[slot], None
        self.finished[reason] += 1
        request.on_finish(reason)

    def _empty_state(self) -> SlotState:
        S = self.slots
        return SlotState(
            cache=make_cache(self.config, S, self.context, self.kv_cache),
            tok_S=jnp.zeros((S,), jnp.int32), live_S=jnp.zeros((S,), bool),
            generated_S=jnp.zeros((S,), jnp.int32), max_new_S=jnp.zeros((S,), jnp.int32),
            temperature_S=jnp.zeros((S,), jnp.float32), top_k_S=jnp.zeros((S,), jnp.int32),
            top_p_S=jnp.ones((S,), jnp.float32),
            key_S2=jnp.zeros((S, 2), jnp.uint32),
            stop_SK=jnp.full((S, MAX_STOP_IDS), -1, jnp.int32))

    def cache_bytes_in_use(self) -> int:
        """Bytes of the slots that hold a request (a slot's cache is reserved whole)."""
        return self.live * self.bytes_per_slot


def cache_bytes(config: GPTConfig, context: int, kv_cache=None) -> int:
    """Bytes one slot's cache takes: its kind's own nbytes at `context` tokens, from shapes."""
    shapes = jax.eval_shape(lambda: make_cache(config, 1, context, kv_cache))
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))


# ---------------------------------------------------------------------------- device side


@functools.partial(jax.jit, static_argnames=("config", "context", "kv_cache"))
def _prefill(params, tokens_1P, length, settings, *, config, context, kv_cache):
    """The prompt into a one-row cache of `context` tokens, and the first new token."""
    _, temperature, top_k, top_p, key_2, _ = settings
    cache = make_cache(config, 1, context, kv_cache)
    logits_11V, cache = apply(params, tokens_1P, config, cache=cache,
                              logits_at=(length - 1).reshape(1, 1))
    tok = sample_slots(logits_11V[:, 0], key_2[None], jnp.zeros((1,), jnp.int32),
                       temperature[None], top_k[None], top_p[None])[0]
    return cache.replace(lengths=length.reshape(1)), tok


def _put(big, one, slot):
    """Row `slot` of `big` from `one`, a one-row leaf. Every cache leaf leads with the batch
    axis or batch·head rows, so a row is one[0].shape[0]-sized block at slot x that size."""
    start = (slot * one.shape[0],) + (0,) * (one.ndim - 1)
    return jax.lax.dynamic_update_slice(big, one.astype(big.dtype), start)


@functools.partial(jax.jit, donate_argnums=0)
def _insert(state: SlotState, one, slot, tok, settings) -> SlotState:
    max_new, temperature, top_k, top_p, key_2, stop_K = settings
    row = lambda x: jnp.asarray(x)[None]
    return state.replace(
        cache=jax.tree.map(lambda big, o: _put(big, o, slot), state.cache, one),
        tok_S=_put(state.tok_S, row(tok), slot),
        live_S=_put(state.live_S, row(True), slot),
        generated_S=_put(state.generated_S, row(jnp.int32(1)), slot),
        max_new_S=_put(state.max_new_S, row(max_new), slot),
        temperature_S=_put(state.temperature_S, row(temperature), slot),
        top_k_S=_put(state.top_k_S, row(top_k), slot),
        top_p_S=_put(state.top_p_S, row(top_p), slot),
        key_S2=_put(state.key_S2, row(key_2), slot),
        stop_SK=_put(state.stop_SK, row(stop_K), slot))


@functools.partial(jax.jit, donate_argnums=0)
def _release(state: SlotState, release_S) -> SlotState:
    return state.replace(live_S=state.live_S & ~release_S)


@functools.partial(jax.jit, static_argnames=("config", "steps", "rows"), donate_argnums=1)
def _step(params, state: SlotState, *, config, steps, rows):
    """`steps` decode steps of the first `rows` slots: (state, tokens [rows, steps], emitted
    [rows, steps], live [rows] after). A free slot among them computes at position 0 and
    emits nothing. With rows below the slots, their part of the state (every leaf leads with
    the slot axis or slot·head rows) is sliced out once and written back once per call: a
    step's cost follows the load, not the capacity."""
    S = state.tok_S.shape[0]
    part = state if rows == S else jax.tree.map(
        lambda x: x[:rows * (x.shape[0] // S)], state)

    def one(state, _):
        cache = state.cache
        live_S = state.live_S
        cache = cache.replace(lengths=jnp.where(live_S, cache.lengths, 0))
        logits_S1V, cache = apply(params, state.tok_S[:, None], config, cache=cache)
        tok_S = sample_slots(logits_S1V[:, 0], state.key_S2, state.generated_S,
                             state.temperature_S, state.top_k_S, state.top_p_S)
        generated_S = state.generated_S + live_S
        still_S = live_S & (generated_S < state.max_new_S) & ~_stopped(tok_S, state.stop_SK)
        state = state.replace(cache=cache, tok_S=jnp.where(live_S, tok_S, state.tok_S),
                              live_S=still_S, generated_S=generated_S)
        return state, (tok_S, live_S)

    part, (toks_KR, emitted_KR) = jax.lax.scan(one, part, length=steps)
    if rows < S:
        part = jax.tree.map(lambda big, p: jax.lax.dynamic_update_slice(big, p, (0,) * big.ndim),
                            state, part)
    return part, toks_KR.T, emitted_KR.T, part.live_S[:rows]
