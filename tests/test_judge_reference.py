"""Judges exact to their papers (issue 11): AlpaGasus' and DEITA's prompts byte for byte against
the reference code, the reference and Winnow parsers on a table of judge replies, the scale
tokens' ids on a SentencePiece tokenizer and on SmolLM2's, and the built-in model end to end:
DEITA's expected value against DEITA's own computation, AlpaGasus generate-and-parse against
`generate` and the reference parser."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from engine.backends.base import RawPrompt
from engine.backends.chat import render_prompt, score_token_ids
from engine.backends.judge_openai import OpenAIJudge
from engine.backends.judge_transformers import TransformersJudge
from engine.models import resolve_model
from engine.records import to_canonical
from engine.signals.judge import (
    ALPAGASUS,
    ALPAGASUS_REMINDER,
    DEITA_COMPLEXITY,
    DEITA_QUALITY,
    REASON_UNPARSED,
    build_prompt,
    custom_definition,
    parse_score,
    parse_score_alpagasus,
    plan_judge_turns,
    resolve_method,
    score_batch,
)
from engine.stages.judge import CustomJudgeSpec, JudgeSpec, judge_methods

# ---------------------------------------------------------------------------------------------
# The reference strings, copied from the reference files.

# gpt4life/alpagasus rating/chatgpt_rating.py (the "accuracy" rating)
REF_SYSTEM = "We would like to request your feedback on the performance of AI assistant in response to the instruction and the given input displayed following."
REF_USER_PROMPT = "Please rate according to the accuracy of the response to the instruction and the input. Each assistant receives a score on a scale of 0 to 5, where a higher score indicates higher level of the accuracy. Please first output a single line containing value indicating the scores. In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias. \n\n"
REF_TRIPLET = "###Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}\n\n"

# hkust-nlp/deita src/deita/selection/scorer/llama_scorer.py (mistral_scorer.py is the same)
REF_COMPLEXITY = "You are a helpful assistant. Please identify the complexity score of the following user query. \n##Query: {instruction}  \n##Complexity: "
REF_QUALITY = "You are a helpful assistant. Please identify the quality score of the Response corresponding to the Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: "
REF_LLAMA_ID2SCORE = {29896: "1", 29906: "2", 29941: "3", 29946: "4", 29945: "5", 29953: "6"}


def ref_parse_score(review: str) -> float:
    """gpt4life/alpagasus rating/filter.py `parse_score`, but returning -1 where the reference
    raises from inside its except block (it would stop the script)."""
    try:
        score = float(review.split("\n")[0])
    except Exception:
        try:
            if "score:" in review:
                score = float(review.split("score:")[1].split("\n")[0])
            elif "Score:" in review:
                score = float(review.split("Score:")[1].strip("\n")[0])
            else:
                score = -1
        except Exception:
            score = -1
    return score


def _alpaca_conversation(row: dict) -> list[dict]:
    """An Alpaca row as ingest stores it, with the input kept on the user turn."""
    conversation = to_canonical(row, "alpaca").conversation
    if row["input"].strip():
        conversation[0] = {**conversation[0], "input": row["input"]}
    return conversation


# ---------------------------------------------------------------------------------------------
# prompts


def test_alpagasus_reference_prompt_is_byte_identical(alpaca_rows: list[dict]) -> None:
    with_input = next(r for r in alpaca_rows if r["input"].strip())
    without = next(r for r in alpaca_rows if not r["input"].strip())
    for row in (with_input, without):
        (turn,) = plan_judge_turns([_alpaca_conversation(row)])
        messages = build_prompt(ALPAGASUS, turn, 2048, "reference")
        assert messages == [
            {"role": "system", "content": REF_SYSTEM},
            {"role": "user", "content": REF_TRIPLET.format_map(row) + REF_USER_PROMPT},
        ]
    # without the input kept on the user turn (ShareGPT, chat data) the input is empty
    (turn,) = plan_judge_turns([to_canonical(without, "alpaca").conversation])
    assert build_prompt(ALPAGASUS, turn, 2048, "reference")[1]["content"] == (
        REF_TRIPLET.format_map(without) + REF_USER_PROMPT
    )


def test_alpagasus_fenced_prompt_keeps_the_papers_words(alpaca_rows: list[dict]) -> None:
    row = next(r for r in alpaca_rows if r["input"].strip())
    (turn,) = plan_judge_turns([_alpaca_conversation(row)])
    system, user = build_prompt(ALPAGASUS, turn)
    assert system["content"].startswith(REF_SYSTEM + "\n\n")
    assert "INSTRUCTION, INPUT, RESPONSE or CONTEXT" in system["content"]
    text = user["content"]
    # Version 3: the paper's rating request first (a prefix every prompt shares), the fenced
    # triplet, then a one-line reminder (the sandwich).
    assert text.startswith(REF_USER_PROMPT + "###Instruction:\n<<<INSTRUCTION\n")
    assert text.endswith("RESPONSE>>>\n\n" + ALPAGASUS_REMINDER)
    assert "\n\n### Input:\n<<<INPUT\n" in text and "\n\n### Response:\n<<<RESPONSE\n" in text
    assert text.count("<<<INPUT") == 1 and text.count(row["input"].split()[0]) >= 1


def test_deita_raw_prompts_are_byte_identical(alpaca_rows: list[dict]) -> None:
    for row in alpaca_rows[:20]:
        conversation = to_canonical(row, "alpaca").conversation
        (turn,) = plan_judge_turns([conversation])
        user = conversation[0]["content"]
        assert build_prompt(DEITA_QUALITY, turn, 2048, "reference") == RawPrompt(
            REF_QUALITY.format(instruction=user, output=row["output"])
        )
        assert build_prompt(DEITA_COMPLEXITY, turn, 2048, "reference") == RawPrompt(
            REF_COMPLEXITY.format(instruction=user)
        )


# ---------------------------------------------------------------------------------------------
# parsing: replies in the styles of GPT-4, Claude and Llama-2-chat judges, and real replies of
# the built-in SmolLM2-135M-Instruct to AlpaGasus prompts (greedy, fp32; the small model rarely
# answers with a number).

REPLIES: list[tuple[str, float | None, float | None]] = [
    # (reply, AlpaGasus reference parser, Winnow's parser on 0..5)
    ("4.5\n\nThe response accurately lists the three primary colors.", 4.5, 4.5),
    ("5\nThe response is fully accurate and complete.", 5.0, 5.0),
    ("3 \nThe response is partly correct.", 3.0, 3.0),
    ("0\nThe response answers a different question.", 0.0, 0.0),
    ("10\nThe response is perfect.", 10.0, None),  # the reference has no scale check
    ("Score: 4\n\nExplanation: the response is correct but brief.", None, 4.0),
    ("Score:4\nThe response is correct.", 4.0, 4.0),  # the reference reads one character
    ("Overall score: 3.5\nThe response misses one step.", 3.5, 3.5),
    ("The response is accurate. score: 5", 5.0, 5.0),
    ("Accuracy score: 4.5/5\nMostly right.", None, 4.5),
    ("1. Accuracy: 4\n2. Relevance: 5\nOverall score: 4.5", 4.5, 4.5),
    ("4/5\n\nThe response is mostly accurate but omits the date.", None, 4.0),
    ("I would rate this response a 4 out of 5.\n\nThe response correctly explains...", None, 4.0),
    ("On a scale of 0 to 5, I'd give it a 4.\n\nThe answer is correct.", None, 4.0),
    ("  Sure! Here is my evaluation:\n\n1. Accuracy: 4\n\nThe response is accurate.", None, 4.0),
    ("**5**\n\nThe response is accurate and well organised.", None, 5.0),
    ("Rating: 2\n\nThe response contains a factual error about the year.", None, 2.0),
    ("The response lists 3 colors correctly but misses context. Score: 4", None, 4.0),
    ("I cannot evaluate this response.", None, None),
    ("", None, None),
    # real SmolLM2-135M-Instruct replies (reference prompt, then fenced prompt)
    ("### Output:\nThe output is 5. The score is 5. The score is 5. The score", None, 5.0),
    (
        "Your response should contain a single line containing a score of 0 to 5.\n\n"
        "Your answer should contain a single line containing a score",
        None,
        None,
    ),
    ("### Explanation:\nThe score of 5 is a perfect score.\n\nThe score of 5 is", None, 5.0),
    ("The statement is an oxymoron.", None, None),
    # an echo of the data, not a score: Winnow's parser takes the first number (a limit of
    # parsing free text; the expected value does not read text)
    ("<<<RESPONSE\nInput:ˆRadiusˆ=ˆ4\nAnswer:ˆAreaˆ=ˆ50.26548245743669\nRES", None, 4.0),
]


@pytest.mark.parametrize(("reply", "reference", "winnow"), REPLIES)
def test_parsers_on_judge_replies(reply: str, reference: float | None, winnow: float | None):
    assert parse_score_alpagasus(reply) == reference
    # the reference parser is the reference's (its -1 is None here)
    assert ref_parse_score(reply) == (-1 if reference is None else reference)
    assert parse_score(reply, (0, 5)) == winnow


def test_winnow_parser_other_scales() -> None:
    assert parse_score("Quality: 6 (on a 1-6 scale)", (1, 6)) == 6.0
    assert parse_score("On a scale of 1 to 10, I rate it 8.", (1, 10)) == 8.0
    assert parse_score("8/10", (0, 5)) is None
    assert parse_score("between 1 and 6: 3", (1, 6)) == 3.0


# ---------------------------------------------------------------------------------------------
# scale tokens


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory: pytest.TempPathFactory, alpaca_rows: list[dict]):
    """A Llama-style SentencePiece tokenizer trained offline on Alpaca text: BPE with digits
    split, byte fallback, a dummy prefix ("▁"), BOS added by `encode`, as Llama-2's."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("sp-tokenizer")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(r["instruction"] + "\n" + r["output"] for r in alpaca_rows[:3000]),
        model_writer=model,
        vocab_size=1000,
        model_type="bpe",
        split_digits=True,
        byte_fallback=True,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": True,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(str(folder))


def test_digit_ids_on_a_sentencepiece_tokenizer(sentencepiece_tokenizer) -> None:
    tok = sentencepiece_tokenizer
    digits = [str(v) for v in range(1, 7)]
    # the bare string "4" is two ids, as with Llama-2 and Mistral: the old lookup lost them all
    assert tok.convert_ids_to_tokens(tok.encode("4", add_special_tokens=False)) == ["▁", "4"]
    ids = score_token_ids(tok, digits)
    # the digit pieces themselves, as DEITA's Llama ids are (29946 is the piece "4", not "▁4")
    assert tok.convert_ids_to_tokens([ids[d] for d in digits]) == digits
    for d in digits:
        # the id the model emits after DEITA's raw prompt (BOS first, ends with "▁") ...
        raw = render_prompt(tok, RawPrompt(REF_QUALITY.format(instruction="Hi", output="Yo")))
        assert raw[0] == tok.bos_token_id and tok.convert_ids_to_tokens(raw[-1]) == "▁"
        with_digit = tok.encode(REF_QUALITY.format(instruction="Hi", output="Yo") + d)
        assert with_digit[:-1] == raw and with_digit[-1] == ids[d]
        # ... and after a newline (a chat template's generation prompt)
        assert tok.encode("Answer:\n" + d)[-1] == ids[d]
    # DEITA's hard-coded Llama-2 ids are one id per score, all distinct: same shape
    assert len(set(REF_LLAMA_ID2SCORE)) == len(set(ids.values())) == 6


def test_digit_ids_on_smollm2_and_missing_ids_raise() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m", None))
    ids = score_token_ids(tok, ALPAGASUS.score_tokens)
    assert [tok.encode(d, add_special_tokens=False) for d in ALPAGASUS.score_tokens] == [
        [ids[d]] for d in ALPAGASUS.score_tokens
    ]
    # a vocabulary without "6": an error naming it, never a silent expected value over 1..5
    vocab = {"<unk>": 0, **{str(v): v for v in range(1, 6)}, "Score": 6, ":": 7}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    small = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    assert score_token_ids(small, ["1", "5"]) == {"1": 1, "5": 5}
    with pytest.raises(ValueError, match="'6'"):
        score_token_ids(small, DEITA_QUALITY.score_tokens)


# ---------------------------------------------------------------------------------------------
# methods, settings, cache keys


def test_methods_and_settings() -> None:
    ref = resolve_method(ALPAGASUS, "reference")
    assert (ref.mode, ref.parser) == ("parse", "alpagasus")
    assert resolve_method(ALPAGASUS, "expected").mode == "expected"
    assert resolve_method(DEITA_QUALITY, "reference").mode == "expected"
    parsed = resolve_method(DEITA_QUALITY, "parse")
    assert (parsed.mode, parsed.parser) == ("parse", "winnow")
    wide = custom_definition("h", CustomJudgeSpec(template="{instruction} {response}"))
    assert resolve_method(wide, "expected").mode == "parse"  # "10" is not one token
    with pytest.raises(ValueError, match="no reference prompt"):
        resolve_method(wide, "reference", "reference")
    assert len({str(m.describe()) for m in (ref, resolve_method(ALPAGASUS, "expected"))}) == 2

    spec = JudgeSpec.model_validate({"alpagasus": {"prompt_style": "reference"}})
    methods = judge_methods(spec, ["alpagasus", "deita_quality"])
    assert [(m.style, m.mode) for m in methods] == [("reference", "parse"), ("fenced", "expected")]
    spec = JudgeSpec.model_validate({"deita": {"prompt_style": "raw"}, "scoring": "expected"})
    assert [m.style for m in judge_methods(spec, ["alpagasus", "deita_complexity"])] == [
        "fenced",
        "reference",
    ]
    with pytest.raises(ValueError, match=r"deita\.prompt_style: raw"):
        JudgeSpec.model_validate({"backend": "openai", "deita": {"prompt_style": "raw"}})


def test_openai_backend_refuses_raw_prompts() -> None:
    judge = OpenAIJudge("http://127.0.0.1:9/v1", model="m", max_retries=0)
    with judge, pytest.raises(TypeError, match="raw"):
        judge.judge([RawPrompt("x")], ("1",))
    assert judge.counters()["requests"] == 0  # refused before asking


# ---------------------------------------------------------------------------------------------
# the built-in model end to end (transformers, fp32)


@pytest.fixture(scope="module")
def smol() -> tuple[str, TransformersJudge]:
    path = resolve_model("builtin:smollm2-135m", None)
    judge = TransformersJudge(
        path, dtype="float32", max_new_tokens=24, max_batch_prompts=4, num_threads=1
    )
    yield path, judge
    judge.close()


def test_deita_raw_expected_value_matches_deitas_computation(smol, alpaca_rows) -> None:
    """DEITA's `Scorer.infer_score` re-done per prompt: `tokenizer.encode`, `generate` with
    `output_scores`, the first step's logits at the scale ids, softmax, times 1..6, summed."""
    import torch
    from scipy.special import softmax

    _, judge = smol
    conversations = [to_canonical(r, "alpaca").conversation for r in alpaca_rows[:4]]
    method = resolve_method(DEITA_QUALITY, "reference", "reference")
    columns = score_batch(judge, [method], conversations, None, 2048, None)
    ids = score_token_ids(judge.tokenizer, DEITA_QUALITY.score_tokens)
    id2score = {ids[str(v)]: str(v) for v in range(1, 7)}
    for conversation, ours in zip(conversations, columns["judge_deita_quality"], strict=True):
        text = REF_QUALITY.format(
            instruction=conversation[0]["content"], output=conversation[1]["content"]
        )
        input_ids = judge.tokenizer.encode(text, return_tensors="pt")
        with torch.inference_mode():
            out = judge.model.generate(
                input_ids,
                max_new_tokens=2,
                num_return_sequences=1,
                return_dict_in_generate=True,
                output_scores=True,
                do_sample=False,
            )
        logits = out.scores[0][0].detach().cpu().numpy()
        score_logits = np.array([logits[k] for k in id2score])
        reference = float(np.sum(softmax(score_logits, axis=0) * np.array([1, 2, 3, 4, 5, 6])))
        assert ours == pytest.approx(reference, rel=1e-4)


def test_alpagasus_reference_scoring_end_to_end(smol, alpaca_rows) -> None:
    """Generate-and-parse through the transformers backend: the reply is the model's greedy
    `generate` on the reference messages, the score the reference parser's, unparsed -> NaN."""
    import torch

    _, judge = smol
    rows = [r for r in alpaca_rows[:12] if r["input"].strip()][:2] + [
        r for r in alpaca_rows[:12] if not r["input"].strip()
    ][:2]
    conversations = [_alpaca_conversation(r) for r in rows]
    method = resolve_method(ALPAGASUS, "reference", "reference")
    columns = score_batch(judge, [method], conversations, None, 2048, None)
    prompts = [
        build_prompt(ALPAGASUS, t, 2048, "reference") for t in plan_judge_turns(conversations)
    ]
    texts = [reply.text for reply in judge.judge(prompts, ())]
    for row, text, score, reason in zip(
        rows, texts, columns["judge_alpagasus"], columns["judge_alpagasus_reason"], strict=True
    ):
        messages = [
            {"role": "system", "content": REF_SYSTEM},
            {"role": "user", "content": REF_TRIPLET.format_map(row) + REF_USER_PROMPT},
        ]
        input_ids = render_prompt(judge.tokenizer, messages)
        with torch.inference_mode():
            out = judge.model.generate(
                torch.tensor([input_ids]), max_new_tokens=24, do_sample=False
            )
        reply = judge.tokenizer.decode(out[0, len(input_ids) :], skip_special_tokens=True)
        assert text == reply
        expected = ref_parse_score(reply)
        if expected == -1:
            assert math.isnan(score) and reason == REASON_UNPARSED
        else:
            assert score == expected and reason is None


def test_expected_scoring_keeps_todays_numbers(smol, alpaca_rows) -> None:
    """`scoring: expected` on the fenced prompt is the backend's expected value over 0..5."""
    _, judge = smol
    conversations = [to_canonical(r, "alpaca").conversation for r in alpaca_rows[:2]]
    method = resolve_method(ALPAGASUS, "expected")
    columns = score_batch(judge, [method], conversations, None, 2048, None)
    turns = plan_judge_turns(conversations)
    replies = judge.judge([build_prompt(ALPAGASUS, t) for t in turns], ALPAGASUS.score_tokens)
    for reply, score in zip(replies, columns["judge_alpagasus"], strict=True):
        lp = reply.score_logprobs
        assert lp is not None and set(lp) == set(ALPAGASUS.score_tokens)
        weights = np.exp(np.array([lp[str(v)] for v in range(6)]))
        assert score == pytest.approx(float(weights @ np.arange(6) / weights.sum()), rel=1e-9)
