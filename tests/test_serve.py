"""The serving engine and its HTTP API, through the official OpenAI client against a real
uvicorn server on 127.0.0.1 (a free port), started and stopped here; every request loop is
bounded in count and time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import openai
import pytest

from gpt2jax import checkpoint, tokenizer
from gpt2jax.cache import TurboQuantConfig
from gpt2jax.config import GPTConfig
from gpt2jax.generation import generate
from gpt2jax.model import init_params
from gpt2jax.serve import engine as engine_lib
from gpt2jax.serve.engine import Engine, Request, Sampling

ROOT = Path(__file__).resolve().parents[1]
CONFIG = GPTConfig(vocab_size=50257, block_size=96, n_layer=2, n_head=2, n_embd=32)
MODEL = "tiny-gpt"
START_S, REQUEST_S = 240, 60


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, params):
    directory = tmp_path_factory.mktemp("serve") / MODEL
    checkpoint.save_params(directory, CONFIG, params)
    return directory


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m gpt2jax.serve` in a child process, ready once it prints its URL."""

    def __init__(self, ckpt: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpt2jax.serve", "--ckpt", str(ckpt), "--port",
             str(self.port), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        deadline = time.monotonic() + START_S
        for line in self.proc.stdout:  # bounded: the process ends or prints the URL
            self.lines.append(line)
            if line.startswith("serving "):
                break
            if time.monotonic() > deadline:
                break
        if not any(line.startswith("serving ") for line in self.lines):
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", timeout=REQUEST_S,
                             max_retries=0)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith(name + " ") or line.startswith(name + "{")))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--slots", "8", "--max-queue", "64")
    yield s
    s.stop()


def _greedy_ids(params, prompt_ids, n):
    out = generate(params, CONFIG, [prompt_ids], max_new_tokens=n, key=jax.random.key(0),
                   temperature=0.0)
    return np.asarray(out)[0].tolist()


def _text(ids):
    """The completion text of ids, cut at <|endoftext|> as the server cuts it."""
    return tokenizer.decode(ids[:ids.index(50256)] if 50256 in ids else ids)


# ---------------------------------------------------------------------------- the engine


def test_engine_compiles_nothing_after_warm_up_whatever_the_mix(params):
    engine = Engine(params, CONFIG, slots=3, context=64, steps_per_call=2)
    engine.warm_up()
    sizes = [f._cache_size() for f in (engine_lib._prefill, engine_lib._insert,
                                       engine_lib._step, engine_lib._release)]
    engine.start()
    done = threading.Event()
    finished = []
    mix = [Sampling(max_tokens=5 + i, temperature=[0.0, 0.7, 1.3][i % 3], top_k=[0, 5][i % 2],
                    top_p=[1.0, 0.9, 0.5][i % 3], seed=i, stop_ids=(7,) if i % 4 else ())
           for i in range(9)]
    for i, sampling in enumerate(mix):
        prompt = list(range(1, 2 + 6 * i))  # 1 to 49 tokens: every prompt bucket
        engine.submit(Request(prompt, sampling, lambda t: None,
                              lambda r: (finished.append(r), len(finished) == 9 and done.set())))
    assert done.wait(REQUEST_S)
    engine.stop(10)
    assert [f._cache_size() for f in (engine_lib._prefill, engine_lib._insert,
                                      engine_lib._step, engine_lib._release)] == sizes


def test_engine_counts_its_time_and_the_rows_its_steps_computed_and_used(params):
    engine = Engine(params, CONFIG, slots=4, context=64, steps_per_call=2)
    engine.warm_up()
    assert engine.steps == engine.rows_computed == 0 and not engine.seconds  # warm-up uncounted
    out = engine.run_one([1, 2, 3], Sampling(max_tokens=6, temperature=0.0))
    assert len(out) == 6  # the first from prefill, then 5 over ceil(5 / 2) = 3 steps
    assert engine.steps == 3 and engine.rows_computed == 3 and engine.rows_live == 3  # 1 row
    assert set(engine.seconds) == {"prefill", "step", "hand_out"}
    assert all(v > 0 for v in engine.seconds.values())


@pytest.mark.parametrize("kv_cache", [None, TurboQuantConfig(bits=3)], ids=["float", "tq3"])
def test_a_step_over_the_first_rows_equals_the_step_over_every_slot(params, kv_cache):
    """At low load a step computes only the rows up to the highest live slot: those rows'
    tokens and cache, and the untouched rest, equal the all-slots step's."""
    engine = Engine(params, CONFIG, slots=4, context=64, steps_per_call=3, kv_cache=kv_cache)
    assert engine.row_counts() == [1, 2, 4]
    for i in range(2):
        engine._admit(Request([3 + i] * (5 + 7 * i), Sampling(max_tokens=20, temperature=0.9,
                                                             seed=i), lambda t: None,
                              lambda r: None))
    assert engine._rows() == 2
    copy = lambda: jax.tree.map(jax.numpy.copy, engine._state)
    full = engine_lib._step(params, copy(), config=CONFIG, steps=3, rows=4)
    part = engine_lib._step(params, copy(), config=CONFIG, steps=3, rows=2)
    np.testing.assert_array_equal(part[1], full[1][:2])
    np.testing.assert_array_equal(part[2], full[2][:2])
    rows = lambda x: x.reshape(4, -1)[:2]  # slot-major leaves: a slot's rows are contiguous
    for a, b in zip(jax.tree.leaves(part[0]), jax.tree.leaves(full[0]), strict=True):
        np.testing.assert_array_equal(rows(a), rows(b))
    for a, b in zip(jax.tree.leaves(part[0]), jax.tree.leaves(engine._state), strict=True):
        np.testing.assert_array_equal(a.reshape(4, -1)[2:], b.reshape(4, -1)[2:])


def test_engine_seeded_sampling_does_not_depend_on_the_other_slots(params):
    """Token n of a request is drawn with fold_in(its seed's key, n): alone or beside
    others, the same seed gives the same tokens."""
    engine = Engine(params, CONFIG, slots=4, context=64, steps_per_call=3)
    sampling = Sampling(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=123)
    alone = engine.run_one([5, 6, 7], sampling)
    engine.start()
    got, done = {}, threading.Event()
    for i in range(4):
        out = []
        s = sampling if i == 2 else Sampling(max_tokens=9, temperature=0.8, seed=i)
        engine.submit(Request([5, 6, 7] if i == 2 else [i + 1], s, out.append,
                              lambda r, i=i, out=out: (got.__setitem__(i, out),
                                                       len(got) == 4 and done.set())))
    assert done.wait(REQUEST_S)
    engine.stop(10)
    assert got[2] == alone and len(alone) == 12
    assert len({tuple(v) for v in got.values()}) == 4


def test_engine_refuses_what_it_cannot_run_with_the_numbers(params):
    engine = Engine(params, CONFIG, slots=1, context=32)
    with pytest.raises(ValueError, match="prompt has 40 tokens; this model's context is 32"):
        engine.check([1] * 40, Sampling(max_tokens=1))
    with pytest.raises(ValueError, match=r"\(20 tokens\) plus max_tokens=20 is 40 tokens.*"
                                         r"at most 12"):
        engine.check([1] * 20, Sampling(max_tokens=20))
    with pytest.raises(ValueError, match="token id 50257 is outside the vocabulary"):
        engine.check([50257], Sampling(max_tokens=1))
    with pytest.raises(ValueError, match="context=200 exceeds block_size=96"):
        Engine(params, CONFIG, slots=1, context=200)


def test_top_k_threshold_keeps_exactly_the_k_largest():
    x = jax.random.normal(jax.random.key(0), (3, 1000))
    k = jax.numpy.asarray([1, 37, 0])
    t = engine_lib.top_k_threshold(x, k)
    kept = np.asarray((x >= t).sum(-1))
    assert kept.tolist() == [1, 37, 1000]


# ---------------------------------------------------------------------------- the HTTP API


def test_greedy_completion_equals_generate_also_with_others_in_flight(server, params):
    prompt = tokenizer.encode("ROMEO: shall I compare thee")
    want = _text(_greedy_ids(params, prompt, 20))
    client = server.client()
    alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20,
                                      temperature=0)
    assert alone.choices[0].text == want

    async def busy():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none",
                                     timeout=REQUEST_S, max_retries=0)
        others = [aclient.completions.create(
            model=MODEL, prompt=f"other {i}", max_tokens=30 + i, temperature=0.5 + 0.1 * i,
            top_p=0.9, seed=i) for i in range(7)]
        mine = aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=20,
                                          temperature=0)
        return await asyncio.gather(mine, *others)

    mine, *others = asyncio.run(asyncio.wait_for(busy(), REQUEST_S))
    assert mine.choices[0].text == want
    assert all(o.choices[0].finish_reason in ("length", "stop") for o in others)


def test_stream_equals_whole_text_usage_and_stop(server):
    client = server.client()
    kwargs = dict(model=MODEL, prompt="To be, or not to be", max_tokens=24, temperature=0.9,
                  seed=7)
    whole = client.completions.create(**kwargs)
    pieces, reasons = [], []
    for chunk in client.completions.create(**kwargs, stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == whole.choices[0].text
    assert reasons[-1] == whole.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer.encode("To be, or not to be"))
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens,
            whole.usage.total_tokens) == (prompt_tokens, 24, prompt_tokens + 24)

    text = whole.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = client.completions.create(**kwargs, stop=[stop, "never-appears"])
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text
                       for c in client.completions.create(**kwargs, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_n_choices_and_a_list_of_prompts(server):
    out = server.client().completions.create(model=MODEL, prompt=["a", "b"], n=2,
                                             max_tokens=5, seed=1)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 20
    assert len({c.text for c in out.choices}) > 1  # each choice its own seed


def test_32_concurrent_requests_none_lost_none_duplicated(server, params):
    prompts = [[100 + i, 200 + i] for i in range(32)]

    async def all_of_them():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none",
                                     timeout=REQUEST_S, max_retries=0)
        return await asyncio.gather(*(aclient.completions.create(
            model=MODEL, prompt=p, max_tokens=8, temperature=0) for p in prompts))

    answers = asyncio.run(asyncio.wait_for(all_of_them(), 2 * REQUEST_S))
    assert len({a.id for a in answers}) == 32
    for prompt, answer in zip(prompts, answers, strict=True):  # each got its own continuation
        assert answer.choices[0].text == _text(_greedy_ids(params, prompt, 8))


@pytest.mark.parametrize("body,status,param", [
    (b'{"model": "tiny-gpt", "prompt": ', 400, None),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": [1] * 120}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1] * 80, "max_tokens": 40}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "prompt": [5, 50257]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": MODEL, "prompt": {"not": "a prompt"}}, 400, "prompt"),
])
def test_bad_input_gets_its_4xx_and_the_server_keeps_serving(server, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/completions", content=content,
                   headers={"Content-Type": "application/json"}, timeout=REQUEST_S)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param or (param and error["param"].startswith(param))
    if param == "prompt" and body["prompt"] == [1] * 120:
        assert "120 tokens" in error["message"] and "96" in error["message"]
    ok = server.client().completions.create(model=MODEL, prompt="next", max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_openai_client_raises_its_own_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=3)
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_metrics_are_prometheus_text(server):
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("gpt2jax_queue_depth", "gpt2jax_live_slots", "gpt2jax_cache_bytes_in_use",
                 "gpt2jax_tokens_generated_total", "gpt2jax_request_latency_seconds_bucket",
                 "gpt2jax_slots 8.0", 'gpt2jax_engine_seconds_total{phase="prefill"}',
                 "gpt2jax_steps_total", "gpt2jax_step_rows_computed_total",
                 "gpt2jax_step_rows_live_total"):
        assert name in text


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """One slot, one place in the queue, and a context long enough that a request holds its
    slot for seconds (1000 tokens): time to fill the queue, or to hang up, behind it."""
    long_ckpt = tmp_path_factory.mktemp("long") / MODEL
    config = CONFIG.replace(block_size=1024)
    checkpoint.save_params(long_ckpt, config, init_params(config, jax.random.key(1)))
    s = Server(long_ckpt, "--slots", "1", "--max-queue", "1", "--steps-per-call", "1")
    yield s
    s.stop()


# greedy: a sampled request ends early wherever the random model draws <|endoftext|>
LONG = {"model": MODEL, "prompt": "a", "max_tokens": 1000, "stream": True, "temperature": 0}


def _first_chunk(lines):
    return next(line for line in lines if line.startswith("data: "))


def test_a_disconnect_frees_its_slot_within_a_step(long_server):
    with httpx.stream("POST", f"{long_server.url}/v1/completions", json=LONG,
                      timeout=REQUEST_S) as r:
        _first_chunk(r.iter_lines())
        assert long_server.metric("gpt2jax_live_slots") == 1
    hung_up = time.monotonic()
    while long_server.metric("gpt2jax_live_slots") > 0 and time.monotonic() < hung_up + 10:
        time.sleep(0.02)
    assert long_server.metric("gpt2jax_live_slots") == 0
    text = httpx.get(f"{long_server.url}/metrics", timeout=10).text
    assert 'gpt2jax_requests_finished_total{reason="cancelled"} 1.0' in text
    assert long_server.metric("gpt2jax_tokens_generated_total") < 1000  # it never ran out


def test_full_queue_is_429_then_sigterm_drains_and_exits_0(long_server):
    server = long_server
    with httpx.stream("POST", f"{server.url}/v1/completions", json=LONG,
                      timeout=REQUEST_S) as running:
        lines = running.iter_lines()
        _first_chunk(lines)  # it holds the one slot
        queued = threading.Thread(target=httpx.post, args=(f"{server.url}/v1/completions",),
                                  kwargs={"json": {**LONG, "stream": False},
                                          "timeout": REQUEST_S})
        queued.start()
        deadline = time.monotonic() + 10
        while server.metric("gpt2jax_queue_depth") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=REQUEST_S)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"

        server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
    queued.join(REQUEST_S)
    assert server.proc.wait(REQUEST_S) == 0


def test_a_budget_that_fits_no_slot_is_one_line(ckpt):
    r = subprocess.run([sys.executable, "-m", "gpt2jax.serve", "--ckpt", str(ckpt),
                        "--cache-memory", "1KiB"], cwd=ROOT, capture_output=True, text=True,
                       timeout=START_S)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "holds no slot: one slot of 96 tokens of float32 cache takes" in r.stderr
