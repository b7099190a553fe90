"""generate(): Hugging Face's greedy tokens, ragged batches, sampling, one compilation."""

from __future__ import annotations

import importlib
import warnings

import jax
import numpy as np
import pytest
from conftest import require

import gpt2jax
from gpt2jax import hf
from gpt2jax.config import GPTConfig
from gpt2jax.generation import generate, generate_stream, sample_logits
from gpt2jax.model import init_params

TINY = dict(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32)
PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12, 7, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


def _model(seed=0, **changes):
    config = GPTConfig(**{**TINY, **changes})
    return config, init_params(config, jax.random.key(seed))


@pytest.fixture(scope="module")
def tiny():
    return _model()


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random-init HF GPT-2 (wide init: well separated logits), and it loaded through us."""
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(
        vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    directory = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(directory)
    return model, *hf.load(directory)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_hugging_face(hf_pair, use_cache):
    import torch

    model, config, params = hf_pair
    n = 20
    ours = np.asarray(generate(params, config, PROMPTS, max_new_tokens=n, key=jax.random.key(0),
                               temperature=0.0, use_cache=use_cache))
    assert ours.shape == (len(PROMPTS), n) and ours.dtype == np.int32
    for b, prompt in enumerate(PROMPTS):  # HF one prompt at a time: no padding involved
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=n, eos_token_id=None, use_cache=use_cache)
        np.testing.assert_array_equal(ours[b], theirs[0, len(prompt):].numpy(), f"prompt {b}")


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_ragged_batch_row_equals_prompt_alone(pos):
    config, params = _model(pos_embedding=pos)
    batch = np.asarray(generate(params, config, PROMPTS, max_new_tokens=12, key=jax.random.key(0),
                                temperature=0.0))
    for b, prompt in enumerate(PROMPTS):
        alone = generate(params, config, [prompt], max_new_tokens=12, key=jax.random.key(0),
                         temperature=0.0)
        np.testing.assert_array_equal(batch[b], np.asarray(alone)[0])


def test_sampling_without_cache_equals_with_cache(tiny):
    config, params = tiny
    kwargs = dict(max_new_tokens=16, key=jax.random.key(3), temperature=0.8, top_k=40, top_p=0.9)
    cached = generate(params, config, PROMPTS, **kwargs)
    np.testing.assert_array_equal(cached, generate(params, config, PROMPTS, use_cache=False,
                                                   **kwargs))


def test_top_k_1_is_greedy_and_keys_drive_samples(tiny):
    config, params = tiny
    run = lambda **kw: np.asarray(generate(params, config, PROMPTS, max_new_tokens=16, **kw))
    greedy = run(key=jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(run(key=jax.random.key(5), temperature=1.3, top_k=1), greedy)
    a = run(key=jax.random.key(1), temperature=1.0)
    np.testing.assert_array_equal(a, run(key=jax.random.key(1), temperature=1.0))
    assert (a != run(key=jax.random.key(2), temperature=1.0)).any()
    assert (a != greedy).any()


def test_rows_that_emit_eos_keep_emitting_it(tiny):
    config, params = tiny
    free = np.asarray(generate(params, config, PROMPTS, max_new_tokens=16,
                               key=jax.random.key(0), temperature=0.0))
    eos = int(free[0, 2])  # row 0 emits it third
    got = np.asarray(generate(params, config, PROMPTS, max_new_tokens=16,
                              key=jax.random.key(0), temperature=0.0, eos_id=eos))
    expected = free.copy()
    for row in expected:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            row[hits[0]:] = eos
    assert (expected[0, 2:] == eos).all()
    np.testing.assert_array_equal(got, expected)


def test_one_compilation_per_prompt_bucket(apply_traces):
    config, params = _model(vocab_size=89)  # a config no other test compiles for
    calls = [  # prompt lengths 3..16 share the 16 bucket
        dict(prompts=[[1, 2, 3]], temperature=0.7, top_p=0.9, key=jax.random.key(0)),
        dict(prompts=[list(range(16))], temperature=0.0, top_p=0.5, key=jax.random.key(1)),
        dict(prompts=[list(range(9))], temperature=1.5, top_p=1.0, key=jax.random.key(2)),
    ]
    counts = []
    for call in calls:
        generate(params, config, max_new_tokens=5, **call)
        counts.append(len(apply_traces))
    assert counts[0] > 0 and counts == [counts[0]] * 3, counts
    generate(params, config, [list(range(17))], max_new_tokens=5, top_p=0.9,
             key=jax.random.key(0))  # the 32 bucket: a new program
    assert len(apply_traces) > counts[0]


@pytest.mark.parametrize(
    "prompts,kwargs,message",
    [
        ([], {}, r"prompts is empty"),
        ([[1, 2], []], {}, r"prompts\[1\] is empty"),
        ([[1, 97]], {}, r"prompts\[0\] holds token id 97, out of range \[0, 97\)"),
        ([[3, -1]], {}, r"token id -1"),
        ([[1.5, 2.0]], {}, r"prompts\[0\] must be a flat list of integer token ids"),
        ("hello", {}, r"list of token-id lists.*tokenizer.encode"),
        ([[1]], dict(max_new_tokens=0), r"max_new_tokens=0 must be a positive integer"),
        ([[1]], dict(max_new_tokens=-3), r"max_new_tokens=-3"),
        ([[1] * 60], dict(max_new_tokens=5),
         r"prompt of 60 tokens \+ max_new_tokens=5 = 65 exceeds block_size=64.*lower "
         r"max_new_tokens to 4"),
        ([[1]], dict(temperature=-0.5), r"temperature=-0.5 must be >= 0"),
        ([[1]], dict(top_k=0), r"top_k=0 must be an integer in \[1, vocab_size=97\]"),
        ([[1]], dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        ([[1]], dict(eos_id=97), r"eos_id=97 is out of range"),
    ],
)
def test_bad_input_is_named_before_any_compute(tiny, prompts, kwargs, message):
    config, params = tiny
    kwargs = {"max_new_tokens": 4, "key": jax.random.key(0), **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(params, config, prompts, **kwargs)


def test_rope_generates_past_block_size_with_a_warning_naming_both_lengths():
    config, params = _model(pos_embedding="rope", block_size=16)
    with pytest.warns(UserWarning, match=r"12 tokens \+ max_new_tokens=20 = 32 positions runs "
                                         r"past block_size=16"):
        out = generate(params, config, [list(range(12))], max_new_tokens=20,
                       key=jax.random.key(0))
    assert out.shape == (1, 20)
    with warnings.catch_warnings():  # exactly at the context: silent
        warnings.simplefilter("error")
        generate(params, config, [list(range(12))], max_new_tokens=4, key=jax.random.key(0))


# ---------------------------------------------------------------------------- streaming


def test_generate_is_importable_from_the_package():
    assert gpt2jax.generate is generate and gpt2jax.generate_stream is generate_stream
    assert importlib.import_module("gpt2jax.generation").sample_logits is sample_logits
    with pytest.raises(ModuleNotFoundError):  # the function shadows no module of that name
        importlib.import_module("gpt2jax.generate")


def test_stream_concatenates_to_generate_compiling_once_per_chunk_shape(tiny, apply_traces):
    """Greedy, then sampled: the chunks join to generate's tokens for the same key. The first
    stream traces the prefill, the 5-step scan at its first chunk only and the 3-step tail
    once; the second (another temperature and key) traces nothing."""
    config, params = tiny
    for temperature, seed in ((0.0, 4), (0.9, 5)):
        kwargs = dict(max_new_tokens=19, key=jax.random.key(seed), temperature=temperature)
        before, chunks, counts = len(apply_traces), [], []
        for chunk in generate_stream(params, config, PROMPTS, chunk_size=5, **kwargs):
            chunks.append(chunk)
            counts.append(len(apply_traces))
        assert [c.shape for c in chunks] == [(3, 1), (3, 5), (3, 5), (3, 5), (3, 3)]
        if temperature == 0.0:
            assert before < counts[0] < counts[1] == counts[2] == counts[3] < counts[4], counts
        else:
            assert counts == [before] * 5, counts
        np.testing.assert_array_equal(np.concatenate(chunks, axis=1),
                                      generate(params, config, PROMPTS, **kwargs))


def test_stream_ends_once_every_row_emitted_eos(tiny):
    config, params = tiny
    kwargs = dict(key=jax.random.key(4), temperature=0.0)
    free = np.asarray(generate(params, config, PROMPTS, max_new_tokens=19, **kwargs))
    # eos: the first token row 0 emits that it had not emitted before (a row alone decodes
    # as in the batch)
    eos_at = next(t for t in range(1, 19) if free[0, t] not in free[0, :t])
    eos = int(free[0, eos_at])
    streamed = np.concatenate(list(generate_stream(params, config, PROMPTS[:1], eos_id=eos,
                                                   max_new_tokens=19, chunk_size=5, **kwargs)),
                              axis=1)
    # the first token, then chunks of 5 up to the one eos came in
    assert streamed.shape == (1, 1 + 5 * -(-eos_at // 5))
    np.testing.assert_array_equal(streamed[0, :eos_at + 1], free[0, :eos_at + 1])
    assert (streamed[0, eos_at:] == eos).all()
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive integer"):
        generate_stream(params, config, PROMPTS, max_new_tokens=4, key=jax.random.key(0),
                        chunk_size=0)
    with pytest.raises(ValueError, match="max_new_tokens=0"):  # raised at the call
        generate_stream(params, config, PROMPTS, max_new_tokens=0, key=jax.random.key(0))


# ---------------------------------------------------------------------------- sample_logits


def _frequencies(logits, n=40_000, **kwargs):
    logits_BV = np.broadcast_to(np.asarray(logits, np.float32), (n, len(logits)))
    kwargs.setdefault("temperature", 1.0)
    ids = jax.jit(sample_logits, static_argnames="top_k")(logits_BV, jax.random.key(0), **kwargs)
    return np.bincount(np.asarray(ids), minlength=len(logits)) / n


def _softmax(x):
    e = np.exp(x - np.max(x))
    return e / e.sum()


LOGITS = np.array([1.0, 3.0, -2.0, 2.5, 0.0, 2.9, -1.0])


def _assert_close_to(freq, probs, n=40_000):
    tolerance = 5 * np.sqrt(probs * (1 - probs) / n) + 1e-9
    assert (np.abs(freq - probs) <= tolerance).all(), (freq, probs)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_samples_follow_the_softmax(temperature):
    freq = _frequencies(LOGITS, temperature=temperature)
    _assert_close_to(freq, _softmax(LOGITS / temperature))


def test_top_k_keeps_the_k_largest():
    freq = _frequencies(LOGITS, top_k=3)
    probs = np.where(np.isin(np.arange(7), [1, 5, 3]), _softmax(LOGITS), 0)
    _assert_close_to(freq, probs / probs.sum())


@pytest.mark.parametrize("top_p,top_k", [(0.5, None), (0.8, None), (0.8, 4), (1.0, None)])
def test_top_p_keeps_the_sorted_nucleus(top_p, top_k):
    probs = _softmax(LOGITS)
    order = np.argsort(-probs)
    if top_k is not None:
        order = order[:top_k]
    kept = order[: np.searchsorted(np.cumsum(probs[order] / probs[order].sum()), top_p) + 1]
    expected = np.where(np.isin(np.arange(7), kept), probs, 0)
    _assert_close_to(_frequencies(LOGITS, top_p=top_p, top_k=top_k), expected / expected.sum())


def test_temperature_zero_is_argmax_even_with_filters():
    logits = np.random.default_rng(0).normal(size=(64, 500)).astype(np.float32)
    ids = sample_logits(logits, jax.random.key(0), 0.0, top_k=5, top_p=0.3)
    np.testing.assert_array_equal(ids, logits.argmax(-1))
