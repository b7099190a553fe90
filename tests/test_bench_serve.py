"""eval.bench_serve's pieces that can be checked without a load run: the fixed request mix,
the budget rule, and the record read back into its table."""

from __future__ import annotations

import dataclasses

import jax

from eval import bench_serve, claims, common
from gpt2jax.config import GPTConfig
from gpt2jax.model import init_params
from gpt2jax.serve.__main__ import CACHE_KINDS
from gpt2jax.serve.engine import cache_bytes


def test_the_mix_is_fixed_and_inside_its_ranges():
    config = GPTConfig.preset("gpt2")
    mix = bench_serve.request_mix(config)
    assert mix == bench_serve.request_mix(config)  # the same requests every run
    lengths = [len(r["prompt"]) for r in mix]
    new = [r["max_tokens"] for r in mix]
    assert (min(lengths), max(lengths)) >= bench_serve.PROMPT_RANGE[:1] * 2
    assert max(lengths) <= bench_serve.PROMPT_RANGE[1] and min(new) >= bench_serve.NEW_RANGE[0]
    assert max(new) <= bench_serve.NEW_RANGE[1]
    assert max(max(r["prompt"]) for r in mix) < 50256  # never <|endoftext|>
    assert bench_serve.CONTEXT == 512 and len({r["seed"] for r in mix}) == len(mix)


def test_the_budget_holds_8_float32_sequences_and_tq3_about_ten_times_more():
    config = GPTConfig.preset("gpt2")
    per_slot = {k: cache_bytes(config, bench_serve.CONTEXT, v) for k, v in CACHE_KINDS.items()}
    assert per_slot["float32"] == 2 * 12 * 768 * 4 * 512 + 4  # 2·L·T·d·4, + its int32 length
    budget = bench_serve.FLOAT32_SEQUENCES * per_slot["float32"]
    slots = {k: budget // v for k, v in per_slot.items()}
    # bfloat16: half the bytes, but each slot's int32 length is not halved: 15, not 16
    assert slots["float32"] == 8 and slots["bfloat16"] == 15
    assert slots["tq3"] >= 8 * 8  # the issue's goal: >= 8x float32's sequences


def test_the_record_reads_back_into_its_table(tmp_path):
    engine = {"prefill_s": 1.0, "step_s": 3.0, "hand_out_s": 0.1, "steps": 10.0,
              "rows_computed": 80.0, "rows_live": 60.0}
    figure = lambda cache, clients, k, tok_s: bench_serve.LoadFigure(
        cache, clients, 8, k, 8, 8, 8, 800, 10.0, tok_s, 1.0, 2.0, 0.1, 0.3, 2**30, engine)
    result = bench_serve.ServeResult(
        preset="gpt2", machine=common.Machine("cpu", 2), code="abc", command="python -m x",
        jax="0", budget_bytes=1, context=512, weight_bytes=2, bytes_per_slot={"float32": 1},
        mix=((32, 64),), baselines=(bench_serve.BaselineFigure("one at a time", 8, 80, 4, 20.0),
                                    bench_serve.BaselineFigure("static batch", 8, 80, 1, 80.0)),
        figures=tuple(figure(c, n, 4, 40.0 * n) for c in CACHE_KINDS for n in (1, 16))
        + (figure("float32", 16, 1, 100.0), figure("float32", 16, 8, 90.0)),
        ceilings=tuple(bench_serve.CeilingFigure(c, 8, n, 0.1 * (1 + (n > 128)))
                       for c in CACHE_KINDS for n in bench_serve.CEILING_FILLED))
    path = common.write_record(tmp_path / "serve.json", result)
    back = common.read_record(path, bench_serve.ServeResult)
    assert back == dataclasses.replace(result)
    assert back.figure("tq3", 16).tok_s == 640.0 and back.figure("float32", 16, 1).tok_s == 100
    text = bench_serve.table(back)
    assert "| tq3 | 8 | 16 | 640.0 | 32.00 |" in text  # 640 / one at a time's 20
    assert "k=1: 100.0 tok/s" in text and "k=4: 640.0 tok/s" in text and "k=8: 90.0" in text
    assert "| 800 / 0 |" not in text and "| 0 / 0 | 25% | 75% |" in text  # 1 of 1+3 s; 60/80
    assert "| tq3 | 8 | 80.0 | 40.0 |" in text  # 8 rows / 0.1 s; / 0.2 s at 480 filled
    # 3 s over 10 calls of 4 steps; 6 of 8 rows live; 640 tok/s against 80 and 40 at 8 rows
    assert "| tq3 | 10.0 | 1.0 | 3.0 | 0.1 | 75 | 6.0 / 8.0 | 640.0 | 8 rows: 80.0 / 40.0 " \
           "| 800% / 1600% |" in text
    assert back.steps_per_call == 4  # the k every cache ran, not the ablation's largest
    assert bench_serve.plot(back, tmp_path / "serve.png").stat().st_size > 0
    summary = bench_serve.summary(back)
    assert "holds sequences of 512 tokens: float32 8, bfloat16 8, tq3 8" in summary
    assert "At 16 closed-loop clients that is float32 640, bfloat16 640, tq3 640" in summary
    assert "(TurboQuant 1.00× float32)" in summary and "at a time: 20 tok/s" in summary
    # claim 5's report reads the same record: capacity beside the bytes
    assert claims.capacity_rows(back)[0] == ["float32", "1", 8, "640.0", "1.00×"]
    assert "tq3 holds 8 sequences of 512 tokens to float32's 8" in claims.capacity_brief(back)


def test_the_ceiling_times_a_decode_call_at_each_row_count_capped_by_the_slots():
    config = GPTConfig.preset("gpt2", n_layer=1, n_head=2, n_embd=64, vocab_size=64)
    params = init_params(config, jax.random.key(0))
    slots = {"float32": 2, "bfloat16": 4, "tq3": 16}
    figures = bench_serve.ceilings(params, config, slots, steps_per_call=2)
    rows = {c: sorted({f.rows for f in figures if f.cache == c}) for c in CACHE_KINDS}
    assert rows == {"float32": [1, 2], "bfloat16": [1, 4], "tq3": [1, 8, 16]}
    assert {f.filled for f in figures} == set(bench_serve.CEILING_FILLED)
    assert all(f.step_s > 0 for f in figures)
