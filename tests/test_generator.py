"""Generators on the real built-in model (SmolLM2-135M-Instruct): the transformers generator's
batched greedy replies equal one-by-one replies, are deterministic, stop at max_new_tokens, give
"" for a prompt over max_length, and refuse work once closed; the vLLM generator (one engine,
slow) gives the same greedy tokens in float32."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.backends import generator
from engine.backends.generator_transformers import TransformersGenerator
from engine.models import resolve_model
from tests.support.factories import factory_settings

MAX_LENGTH = 256
MAX_NEW_TOKENS = 16

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three colors."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write a haiku about the sea in the morning light, please."},
    ],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Explain in one sentence why the sky is blue."}],
]
TOO_LONG = [{"role": "user", "content": "Repeat after me: " + "lorem ipsum dolor " * 120}]


def settings(**overrides: object) -> dict:
    """What a stage hands the `generator` factory."""
    return factory_settings(
        **{
            "max_length": MAX_LENGTH,
            "max_new_tokens": MAX_NEW_TOKENS,
            "max_batch_prompts": 4,
            "num_threads": 1,  # the machine is shared: 2 threads under load run far slower than 1
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model("builtin:smollm2-135m")


@pytest.fixture(scope="module")
def tf_gen(model_path: str):
    gen = generator("transformers", model_path, **settings())
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def batched(tf_gen) -> list[str]:
    return tf_gen.generate(PROMPTS)


def test_factory_builds_a_cpu_transformers_generator(tf_gen) -> None:
    assert isinstance(tf_gen, TransformersGenerator)
    assert tf_gen.device.type == "cpu" and tf_gen.max_batch_prompts == 4
    assert tf_gen.eos_ids == {tf_gen.tokenizer.eos_token_id}
    with pytest.raises(ValueError, match="unknown generator backend 'tgi'"):
        generator("tgi", "unused", **settings())


def test_batched_equals_one_by_one(tf_gen, batched: list[str]) -> None:
    """Length-sorted batches of 4, left-padded with explicit positions: the same greedy replies
    as each prompt alone (5 prompts: one batch of 4 plus one of 1, in another order)."""
    assert len(batched) == len(PROMPTS)
    assert all(isinstance(t, str) and t.strip() for t in batched)
    alone = [tf_gen.generate([p])[0] for p in PROMPTS]
    assert alone == batched
    assert tf_gen.generate([]) == []


def test_greedy_is_deterministic(tf_gen, batched: list[str]) -> None:
    """Another call, the prompts in another order (so in other batches): the same replies."""
    assert tf_gen.generate(list(reversed(PROMPTS))) == list(reversed(batched))


def test_max_new_tokens_and_eos(tf_gen, batched: list[str], model_path: str) -> None:
    """Every reply stops at max_new_tokens or at its first EOS; a shorter budget gives a prefix
    of the same greedy tokens; the reply text is those tokens decoded, no special token."""
    ids = tf_gen.generate_token_ids(PROMPTS)
    eos = tf_gen.tokenizer.eos_token_id
    decoded = [tf_gen.tokenizer.decode([t for t in row if t != eos]) for row in ids]
    assert decoded == batched
    assert all(tf_gen.tokenizer.eos_token not in t for t in batched)
    for row in ids:
        assert 1 <= len(row) <= MAX_NEW_TOKENS
        assert eos not in row[:-1]
        assert len(row) == MAX_NEW_TOKENS or row[-1] == eos
    assert any(len(row) == MAX_NEW_TOKENS and row[-1] != eos for row in ids), ids
    assert any(row[-1] == eos for row in ids), ids
    short = generator("transformers", model_path, **settings(max_new_tokens=3))
    try:
        short_ids = short.generate_token_ids(PROMPTS)
    finally:
        short.close()
    for row, full in zip(short_ids, ids, strict=True):
        assert len(row) <= 3 and row == full[: len(row)]


def test_too_long_prompt_gives_empty_reply(tf_gen, batched: list[str]) -> None:
    from engine.backends.chat import render_chat

    assert len(render_chat(tf_gen.tokenizer, TOO_LONG)) > MAX_LENGTH
    replies = tf_gen.generate([PROMPTS[0], TOO_LONG, PROMPTS[3]])
    assert replies == [batched[0], "", batched[3]]
    assert tf_gen.generate_token_ids([TOO_LONG]) == [[]]


def test_closed_generator_refuses_work(model_path: str) -> None:
    gen = TransformersGenerator(model_path, dtype="float32", max_new_tokens=2, num_threads=1)
    with gen:
        assert gen.generate(PROMPTS[:1])[0]
    assert gen.closed and not hasattr(gen, "model")
    gen.close()  # idempotent
    with pytest.raises(RuntimeError, match="the transformers backend is closed"):
        gen.generate(PROMPTS[:1])


# ---------------------------------------------------------------------------------------------
# vLLM (one engine start for the module: 30-170 s on 2 cores)

VLLM_NEW_TOKENS = 8
SAME_FIRST_TOKENS = 4


@pytest.fixture(scope="module")
def vllm_gen(tmp_path_factory: pytest.TempPathFactory, model_path: str):
    """One float32 eager engine; its caches and temporary files inside the test."""
    tmp: Path = tmp_path_factory.mktemp("vllm-gen")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(tmp))
        mp.setenv("VLLM_CACHE_ROOT", str(tmp / "vllm-cache"))
        gen = generator(
            "vllm", model_path, **settings(dtype="float32", max_new_tokens=VLLM_NEW_TOKENS)
        )
        try:
            yield gen
        finally:
            gen.close()


@pytest.mark.slow
def test_vllm_greedy_matches_transformers(vllm_gen, model_path: str) -> None:
    """Both float32 and greedy: the first tokens of each reply agree (later tokens may part on a
    near-tie: vLLM's CPU kernels sum in another order); a prompt over max_length gives ""; the
    closed engine refuses work."""
    from engine.backends.generator_vllm import VllmGenerator

    assert isinstance(vllm_gen, VllmGenerator)
    prompts = PROMPTS[:3]
    reference = generator("transformers", model_path, **settings(max_new_tokens=VLLM_NEW_TOKENS))
    try:
        want_ids = reference.generate_token_ids(prompts)
        want = reference.generate(prompts)
    finally:
        reference.close()
    got_ids = vllm_gen.generate_token_ids([*prompts, TOO_LONG])
    got = vllm_gen.generate([*prompts, TOO_LONG])
    print(f"vLLM: {got[:3]}\ntransformers: {want}")
    assert got_ids[3] == [] and got[3] == ""
    for v, t in zip(got_ids[:3], want_ids, strict=True):
        assert 1 <= len(v) <= VLLM_NEW_TOKENS
        assert v[:SAME_FIRST_TOKENS] == t[:SAME_FIRST_TOKENS], (v, t)
    same = [v == t for v, t in zip(got_ids[:3], want_ids, strict=True)]
    for g, w, whole in zip(got[:3], want, same, strict=True):
        assert g.strip()
        if whole:
            assert g == w
    vllm_gen.close()
    with pytest.raises(RuntimeError, match="the vllm backend is closed"):
        vllm_gen.generate(prompts)
