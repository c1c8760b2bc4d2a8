"""The transformers LM backend on real models: IFD arithmetic by hand on a tiny random Llama, and
batched answer-only scoring against the batch-1 full-logits reference on SmolLM2-135M."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.backends import lm_scorer
from engine.backends.hf import cpu_supports_bf16, resolve_device, resolve_dtype
from engine.backends.transformers_lm import TransformersScorer, reference_token_nll
from engine.records import to_canonical
from engine.signals.lm import ScoredSequence, fit, plan_turns, record_signals
from tests.support.factories import factory_settings

ALPACA = Path(__file__).resolve().parents[1].parent / "shared/data/alpaca_random_9k.json"
# The first 20 rows plus four whose answer runs past 256 tokens, so truncation is exercised.
ALPACA_ROWS = [*range(20), 27, 84, 181, 201]

VOCABULARY = (
    "what is the capital of france paris it is a city in europe and which river flows through "
    "seine name one more famous place eiffel tower louvre museum thanks you are welcome"
)
WORDS = VOCABULARY.split()


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """A randomly initialised 2-layer Llama and a word-level tokenizer, saved as a model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *dict.fromkeys(WORDS), "?", "."])}
    assert len(vocab) <= 64
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.3,  # sharper predictions than the default 0.02, so IFD is not ~1
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder), model, AutoTokenizer.from_pretrained(str(folder))


def hand_nll(model, ids: list[int], score_from: int) -> np.ndarray:
    """Full logits of one sequence, log_softmax in float64, minus the log-prob of each token."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return np.array([-float(logp[j - 1, ids[j]]) for j in range(score_from, len(ids))])


def test_ifd_by_hand_on_tiny_llama(tiny) -> None:
    folder, model, tokenizer = tiny
    u1, a1 = "what is the capital of france ?", "paris is the capital of france ."
    u2, a2 = "which river flows through it ?", "the seine flows through paris ."
    conversation = [
        {"role": "user", "content": u1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": u2},
        {"role": "assistant", "content": a2},
    ]

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    bos = tokenizer.bos_token_id
    # the "plain" template: every earlier turn joined by newlines, then a newline
    turns = [(enc(f"{u1}\n"), enc(a1)), (enc(f"{u1}\n{a1}\n{u2}\n"), enc(a2))]
    cond = [hand_nll(model, p + a, len(p)) for p, a in turns]
    direct = [hand_nll(model, [bos, *a], 1) for _, a in turns]
    lc, ld = np.mean(np.concatenate(cond)), np.mean(np.concatenate(direct))
    expected = {
        "loss_cond": lc,
        "loss_direct": ld,
        "ppl_cond": math.exp(lc),
        "ppl_direct": math.exp(ld),
        "ifd": lc / ld,
        "ifd_ppl": math.exp(lc) / math.exp(ld),
    }
    turn_ifd = [c.mean() / d.mean() for c, d in zip(cond, direct, strict=True)]

    plans = plan_turns(tokenizer, [conversation], "plain", max_length=64)
    assert [(p.cond.token_ids, p.cond.score_from) for p in plans] == [
        (p + a, len(p)) for p, a in turns
    ]
    assert [p.direct.token_ids for p in plans] == [[bos, *a] for _, a in turns]
    scorer = TransformersScorer(folder, dtype="float32", max_batch_tokens=24)
    nll = scorer.token_nll([p.cond for p in plans] + [p.direct for p in plans])
    scorer.close()
    for got, want in zip(nll, cond + direct, strict=True):
        assert got.dtype == np.float64 and got.shape == want.shape
        assert np.max(np.abs(got - want) / want) <= 1e-6
    row = record_signals(["r0"], plans, nll[:2], nll[2:]).to_pylist()[0]
    assert abs(expected["ifd"] - 1) > 1e-3  # the check below is not trivially 1 == 1
    for name, value in expected.items():
        assert rel(row[name], value) <= 1e-6, name
    assert all(rel(g, w) <= 1e-6 for g, w in zip(row["turn_ifd"], turn_ifd, strict=True))
    assert row["answer_tokens"] == sum(len(a) for _, a in turns)
    assert (row["lm_turns"], row["truncated"], row["lm_reason"]) == (2, False, None)


def test_batching_matches_reference_on_tiny_llama(tiny) -> None:
    folder, model, _ = tiny
    rng = np.random.default_rng(0)
    sequences = [
        ScoredSequence(rng.integers(0, 64, n).tolist(), s)
        for n, s in [(5, 1), (40, 30), (7, 6), (12, 12), (33, 2), (6, 1), (40, 1), (9, 8), (2, 1)]
    ]
    scorer = TransformersScorer(folder, dtype="float32", max_batch_tokens=64, num_threads=1)
    assert scorer.token_nll([]) == []
    batches = scorer.batches(sequences)
    assert len(batches) >= 3
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 4, 5, 6, 7, 8]  # 3 scores nothing
    for batch in batches:
        width = max(len(sequences[i].token_ids) for i in batch)
        assert len(batch) == 1 or len(batch) * width <= 64
    got = scorer.token_nll(sequences)
    want = reference_token_nll(model, sequences)
    scorer.close()
    with pytest.raises(RuntimeError, match="the transformers backend is closed"):
        scorer.token_nll(sequences)
    scorer.close()  # idempotent
    assert scorer.closed and not hasattr(scorer, "model")
    assert [len(g) for g in got] == [len(s.token_ids) - s.score_from for s in sequences]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="score_from"):
        reference_token_nll(model, [ScoredSequence([1, 2, 3], 0)])


def test_fit_truncation_rule() -> None:
    prompt, answer = list(range(10)), list(range(100, 120))
    assert fit(prompt[:3], answer[:5], 8) == (prompt[:3], answer[:5], False)  # exactly fits
    # long prompt, short answer: the answer is whole, the prompt keeps its last tokens
    assert fit(prompt, answer[:2], 8) == (prompt[4:], answer[:2], True)
    # short prompt, long answer: the prompt is whole, the answer keeps its start
    assert fit(prompt[:3], answer, 8) == (prompt[:3], answer[:5], True)
    # both long: the answer keeps at least max_length // 2 tokens
    assert fit(prompt, answer, 8) == (prompt[6:], answer[:4], True)
    assert fit([], answer, 8) == ([], answer[:8], True)


def test_plan_truncation_scores_the_same_answer_tokens(tiny) -> None:
    _, _, tokenizer = tiny
    long_answer = " ".join(WORDS)
    conversation = [
        {"role": "user", "content": "what is the capital of france ?"},
        {"role": "assistant", "content": long_answer},
    ]
    (plan,) = plan_turns(tokenizer, [conversation], "plain", max_length=16)
    assert plan.truncated
    # the 7-token prompt stays whole and the answer keeps max(16 - 7, 16 // 2) = 9 tokens
    assert len(plan.cond.token_ids) == 16 and plan.cond.score_from == 7
    assert plan.cond.token_ids[plan.cond.score_from :] == plan.direct.token_ids[1:]
    assert plan.direct.token_ids[0] == tokenizer.bos_token_id and plan.direct.score_from == 1
    with pytest.raises(ValueError, match="max_length"):
        plan_turns(tokenizer, [conversation], "plain", max_length=3)


def test_empty_answer_gives_nan_and_reason(tiny) -> None:
    folder, _, tokenizer = tiny
    conversations = [
        [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": "  "}],
        [
            {"role": "user", "content": "thanks"},
            {"role": "assistant", "content": "you are welcome"},
        ],
        [{"role": "assistant", "content": "welcome"}],  # no user turn before it
    ]
    plans = plan_turns(tokenizer, conversations, "plain", max_length=32)
    assert [p.record for p in plans] == [1]
    scorer = TransformersScorer(folder, dtype="float32")
    nll = scorer.token_nll([p.cond for p in plans] + [p.direct for p in plans])
    scorer.close()
    rows = record_signals(["a", "b", "c"], plans, nll[:1], nll[1:]).to_pylist()
    for row in (rows[0], rows[2]):
        assert math.isnan(row["ifd"]) and math.isnan(row["loss_cond"])
        assert (row["lm_reason"], row["answer_tokens"], row["lm_turns"]) == (
            "no_scorable_answer",
            0,
            0,
        )
    assert rows[1]["lm_reason"] is None and rows[1]["answer_tokens"] == 3
    assert math.isfinite(rows[1]["ifd"])


def test_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    assert resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", cpu)


def test_device_honours_use_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA only when asked for AND present: a CPU actor never takes a GPU it was not given."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(False) == torch.device("cpu")
    assert resolve_device(True) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(True) == torch.device("cpu")
    assert resolve_device(False) == torch.device("cpu")


def test_vllm_dtype_auto_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    """The job spec's "auto" for vLLM: bf16 where native, else fp32 (vLLM's own "auto" would be
    the checkpoint's dtype); explicit dtypes pass through."""
    from engine.backends.vllm_engine import vllm_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vllm_dtype("auto") == ("bfloat16" if cpu_supports_bf16() else "float32")
    assert vllm_dtype("float32") == "float32" and vllm_dtype("bfloat16") == "bfloat16"


def test_factory_builds_the_transformers_scorer(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lm_scorer` with the stage's settings: the CPU although CUDA "exists" (use_gpu=False), a
    context manager that closes; an unknown backend is refused."""
    folder, model, _ = tiny
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    settings = factory_settings(max_length=64, max_batch_tokens=64)
    sequences = [ScoredSequence([1, 5, 9, 12, 3], 2)]
    scorer = lm_scorer("transformers", folder, **settings)
    assert isinstance(scorer, TransformersScorer) and scorer.device.type == "cpu"
    with scorer:
        got = scorer.token_nll(sequences)
    assert scorer.closed
    np.testing.assert_allclose(got[0], reference_token_nll(model, sequences)[0], rtol=1e-5)
    with pytest.raises(ValueError, match="unknown LM backend 'llamacpp'"):
        lm_scorer("llamacpp", folder, **settings)


# ---- SmolLM2-135M on real Alpaca rows ----------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from engine.models import resolve_model

    path = resolve_model("builtin:smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    conversations = [to_canonical(rows[i], "alpaca").conversation for i in ALPACA_ROWS]
    plans = plan_turns(tokenizer, conversations, "alpaca", max_length=256)
    assert len(plans) == len(ALPACA_ROWS) and sum(p.truncated for p in plans) >= 4
    sequences = [p.cond for p in plans] + [p.direct for p in plans]
    scorer = TransformersScorer(path, dtype="float32", num_threads=1)
    batched = scorer.token_nll(sequences)
    reference = reference_token_nll(scorer.model, sequences)
    scorer.close()
    return path, plans, sequences, batched, reference


@pytest.mark.slow
def test_batched_equals_batch1_reference_on_smollm2(smollm2) -> None:
    _, plans, sequences, batched, reference = smollm2
    for seq, got, want in zip(sequences, batched, reference, strict=True):
        assert len(got) == len(want) == len(seq.token_ids) - seq.score_from
        assert rel(got.mean(), want.mean()) <= 1e-4
    n = len(plans)
    ids = [str(i) for i in range(n)]
    ours = record_signals(ids, plans, batched[:n], batched[n:])
    ref = record_signals(ids, plans, reference[:n], reference[n:])
    np.testing.assert_allclose(ours["ifd"].to_numpy(), ref["ifd"].to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(ours["ifd_ppl"].to_numpy(), ref["ifd_ppl"].to_numpy(), rtol=1e-4)
    assert ours["truncated"].to_pylist() == [p.truncated for p in plans]


@pytest.mark.slow
def test_bf16_close_to_fp32_on_smollm2(smollm2) -> None:
    """Observed here (12 rows; an AVX2 CPU without native bf16, so bf16 is emulated and ~4x
    slower than fp32): median relative IFD difference ~0.5%, most rows < 2%, the worst ~6.5% on
    one-token answers ("Positive", "Yes") where one token's bf16 rounding is the whole mean;
    correlation with fp32 > 0.999. A float32 output head only trims the worst case to ~5%."""
    path, plans, _, fp32, _ = smollm2
    n = 12  # bf16 is emulated on CPUs without AVX512-BF16/AMX: keep the slow part small
    scorer = TransformersScorer(path, dtype="bfloat16", num_threads=1)
    assert scorer.dtype == torch.bfloat16
    bf16 = scorer.token_nll([p.cond for p in plans[:n]] + [p.direct for p in plans[:n]])
    scorer.close()
    ifd32 = np.array([fp32[k].mean() / fp32[len(plans) + k].mean() for k in range(n)])
    ifd16 = np.array([bf16[k].mean() / bf16[n + k].mean() for k in range(n)])
    diff = np.abs(ifd16 / ifd32 - 1)
    assert np.median(diff) <= 2e-2
    assert np.mean(diff <= 2e-2) >= 0.75
    assert diff.max() <= 0.1
    assert np.corrcoef(ifd16, ifd32)[0, 1] >= 0.99


def test_reference_definitions_plan_their_own_token_positions() -> None:
    """Planning alone (no model), SmolLM2's tokenizer (no BOS): Cherry scores the answer after
    '### Response:' from the prompt's token count on; Superfiltering's direct side is the bare
    answer scored from its second token; a prompt that fills max_length is skipped with its
    reason, and `record_signals` carries that reason."""
    from transformers import AutoTokenizer

    from engine import reasons
    from engine.models import resolve_model
    from engine.signals.lm import CHERRY_PROMPT_INPUT, plan_records

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m"))
    answer = "The capital of France is Paris."
    record = {
        "instruction": "Answer the question.",
        "input": "Capital of France?",
        "output": answer,
    }
    conversation = to_canonical(record, "alpaca").conversation
    long_record = {"instruction": "word " * 600, "output": answer}
    conversations = [conversation, to_canonical(long_record, "alpaca").conversation]

    cherry = plan_records(tokenizer, conversations, 512, definition="cherry")
    (turn,) = cherry.turns
    prompt = CHERRY_PROMPT_INPUT.format(instruction=record["instruction"], input=record["input"])
    assert turn.cond.token_ids == tokenizer.encode(prompt + answer)
    assert turn.cond.score_from == len(tokenizer.encode(prompt))
    assert turn.direct.token_ids == tokenizer.encode("### Response:" + answer)
    assert turn.direct.score_from == len(tokenizer.encode("### Response:")) == 3
    assert cherry.skipped == {1: reasons.LM_PROMPT_TOO_LONG}

    # 600 prompt tokens fit Superfiltering's 1024
    superfiltering = plan_records(tokenizer, conversations, 1024, definition="superfiltering")
    turn = superfiltering.turns[0]
    assert [t.record for t in superfiltering.turns] == [0, 1]
    prompt = f"{record['instruction']}\n{record['input']}\n"
    assert turn.cond.token_ids == tokenizer.encode(prompt + answer)
    assert turn.cond.score_from == len(tokenizer.encode(prompt))
    assert turn.direct == ScoredSequence(tokenizer.encode(answer), 1)
    assert superfiltering.skipped == {}

    nll = [np.array([1.0, 2.0]), np.array([2.0, 2.0, 2.0])]
    rows = record_signals(["a", "b"], cherry.turns, nll[:1], nll[1:], cherry.skipped).to_pylist()
    assert rows[0]["ifd"] == pytest.approx(1.5 / 2.0) and rows[0]["answer_tokens"] == 2
    assert rows[1]["lm_reason"] == reasons.LM_PROMPT_TOO_LONG and math.isnan(rows[1]["ifd"])
    with pytest.raises(ValueError, match="definition"):
        plan_records(tokenizer, conversations, 512, definition="alpagasus")  # type: ignore[arg-type]
