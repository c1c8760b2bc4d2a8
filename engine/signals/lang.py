"""Language identification: per-record language of the instruction and the response side.

Detector: `lingua-language-detector` (Rust core, Python wheel).
- No download at run time: its n-gram models for 75 languages ship inside the wheel, so a worker
  on a cluster without internet needs nothing beyond `pip install` (fastText's lid.176 model is a
  126 MB download, and the `fasttext` wheels are unmaintained; `langdetect` is a slow pure-Python
  port, non-deterministic unless seeded, and unmaintained since 2021).
- Accurate on short texts (a few words), which instruction/response pairs often are: it combines
  unigram to 5-gram models with script rules, where fastText and langdetect degrade on short text.
- Maintained (2.x, 2025) and deterministic; returns calibrated relative confidences per language.
Cost: with every language, high-accuracy mode holds ~1.2-1.4 GB per process (models load lazily,
shared by every detector in the process), so the detector is built once per process and Spark runs
few Python workers. Low-accuracy mode (trigrams only) is several times faster and, by lingua's
own evaluation, as accurate as high accuracy on texts of 120 characters or more; it loses only
on short texts. So `accuracy="auto"` (the default) sends texts of at least `LONG_TEXT_CHARS`
cleaned characters to a low-accuracy detector and shorter ones to a high-accuracy one;
"high" and "low" force one mode.

Rules (the column contract, LANG_SCHEMA):
- Instruction side = all user turns joined; response side = all assistant turns joined.
- Before detection: fenced code blocks, inline code, lines that look like code, URLs, e-mail
  addresses, digits, punctuation, symbols and emoji are removed; only the first `max_chars`
  characters of what is left are looked at (lingua's cost grows with length, the answer does not).
- A side with fewer than `min_chars` letters left is "und" (undetermined) with confidence NaN;
  so is a side the detector cannot place (all confidences 0).
- Codes are ISO 639-1, lowercase.
- Script-unique languages are fixed by their script when lingua disagrees with it: text that is
  mostly Hangul is Korean, Han with kana is Japanese, Han without kana is Chinese (lingua sometimes
  calls short kana-less Han text Japanese, or the other way round); the confidence is then at
  least 0.99.
- `lang_mismatch` is true when lingua's rule or the script rule flags the record (the script
  rule can be switched off: `by_script=False`). It is null when the record has no side at all.
  - lingua's rule: both sides are determined, both confidences are at least `min_confidence`,
    and the languages differ; a side that is "und" (code only, too short) never flags.
  - the script rule (`script_mismatch`, also its own column): the two sides' dominant scripts
    are incompatible, whatever lingua's confidence (a short English instruction answered in
    Chinese has a low relative confidence, but its scripts settle it). On the cleaned text (no
    code, URLs, digits, math symbols), letters are counted per script, Han x3 and kana and
    Hangul x2 (one such character carries about a word or a syllable); kana counts as Han
    (Japanese mixes them). Each side needs a weight of at least `min_chars` and its dominant
    script at least `SCRIPT_MIN_SHARE` of it (mixed text never flags); the dominant scripts
    must be known (Latin, Cyrillic, Greek, Han/kana, Hangul, Arabic, Hebrew, Devanagari, Thai,
    ...), differ, and each be under `SCRIPT_MAX_CROSS_SHARE` of the other side (a Chinese user
    who pastes unfenced code is not answered in a "foreign" script); and the instruction side
    must not ask for another language: one that mentions translating or names a language
    (`asks_for_language`: English words and the compared scripts' own) is a legitimate
    mismatch and is exempt.
- Confidences are lingua's relative values among the candidate languages: with all 75, short
  English instructions score low (Alpaca instructions, measured: median 0.73, a quarter below
  0.52) and so rarely flag a mismatch at 0.5; a language list (10 languages: median 0.94) makes
  them sharper.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pyarrow as pa

LANG_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("lang", pa.string()),  # ISO 639-1 of the instruction side ("und" when undetermined)
        ("lang_confidence", pa.float64()),
        ("response_lang", pa.string()),
        ("response_lang_confidence", pa.float64()),
        ("lang_mismatch", pa.bool_()),  # lingua's rule or the script rule (module docstring)
        ("script_mismatch", pa.bool_()),  # the script rule alone
    ]
)

UNDETERMINED = "und"
DEFAULT_MAX_CHARS = 500  # plenty of prose to place a language; lingua's cost is linear
LONG_TEXT_CHARS = 120
ACCURACY_MODES = ("auto", "high", "low")
# Only this many raw characters per kept character are cleaned (a 100 kB answer costs no more).
RAW_CHARS_PER_CLEAN_CHAR = 8

_FENCED = re.compile(r"(```|~~~).*?(?:\1|\Z)", re.S)  # an unclosed fence runs to the end
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_URL = re.compile(r"(?:https?://|ftp://|www\.)\S+|\S+@\S+\.\w+", re.I)
_CODE_START = re.compile(
    r"^\s*(?:def |class |import |from \S+ import |return\b|#include|function\b|var |let |const |"
    r"public |private |static |package |using |SELECT |INSERT |UPDATE |CREATE |if \(|for \(|"
    r"while \(|else\s*\{|\}|<\/?[a-zA-Z][^>]*>|\$ |>>> |print\(|console\.)"
)
_CODE_SYMBOLS = frozenset("{}()[];=<>$_\\/*+|&#@^~")


def _looks_like_code(line: str) -> bool:
    """A line whose start, end or symbol density says code, not prose."""
    stripped = line.strip()
    if not stripped:
        return False
    if _CODE_START.match(stripped) or stripped.endswith((";", "{", "}", ");")):
        return True
    visible = [c for c in stripped if not c.isspace()]
    symbols = sum(c in _CODE_SYMBOLS for c in visible)
    return len(visible) >= 4 and symbols / len(visible) > 0.2


class _NonTextToSpace(dict[int, int]):
    """`str.translate` table: every code point that is not a letter, a combining mark or a
    space becomes a space (marks matter: Devanagari or Thai vowels are marks); filled lazily,
    one Unicode lookup per distinct code point per process.

    Was one regex over a character class of every such code point: `sub` on it took 10.3 s for
    2,000 ShareGPT sides (4.1 M characters), `translate` 0.21 s with identical output once the
    spaces are collapsed (a run of dropped characters became one space, now each one does)."""

    def __missing__(self, cp: int) -> int:
        drop = unicodedata.category(chr(cp))[0] not in "LMZ" and cp not in (9, 10, 13)
        self[cp] = value = 32 if drop else cp
        return value


_NON_TEXT_TO_SPACE = _NonTextToSpace()


def clean_text(text: str | None, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Prose only: code, URLs, digits, punctuation, symbols and emoji removed, spaces collapsed."""
    if not text:
        return ""
    text = _FENCED.sub(" ", text[: RAW_CHARS_PER_CLEAN_CHAR * max_chars])
    text = _INLINE_CODE.sub(" ", text)
    text = _URL.sub(" ", text)
    lines = [line for line in text.splitlines() if not _looks_like_code(line)]
    text = "\n".join(lines).translate(_NON_TEXT_TO_SPACE)
    return " ".join(text.split())[:max_chars]


def letter_count(cleaned: str) -> int:
    return sum(1 for c in cleaned if not c.isspace())


# --- scripts -------------------------------------------------------------------------------------

_SCRIPT_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0041, 0x024F, "Latin"),
    (0x1E00, 0x1EFF, "Latin"),
    (0x0370, 0x03FF, "Greek"),
    (0x1F00, 0x1FFF, "Greek"),
    (0x0400, 0x052F, "Cyrillic"),
    (0x0530, 0x058F, "Armenian"),
    (0x0590, 0x05FF, "Hebrew"),
    (0x0600, 0x06FF, "Arabic"),
    (0x0750, 0x077F, "Arabic"),
    (0xFB50, 0xFDFF, "Arabic"),
    (0xFE70, 0xFEFF, "Arabic"),
    (0x0900, 0x097F, "Devanagari"),
    (0x0980, 0x09FF, "Bengali"),
    (0x0A00, 0x0A7F, "Gurmukhi"),
    (0x0A80, 0x0AFF, "Gujarati"),
    (0x0B80, 0x0BFF, "Tamil"),
    (0x0C00, 0x0C7F, "Telugu"),
    (0x0C80, 0x0CFF, "Kannada"),
    (0x0D00, 0x0D7F, "Malayalam"),
    (0x0D80, 0x0DFF, "Sinhala"),
    (0x0E00, 0x0E7F, "Thai"),
    (0x0E80, 0x0EFF, "Lao"),
    (0x1000, 0x109F, "Myanmar"),
    (0x1200, 0x137F, "Ethiopic"),
    (0x1780, 0x17FF, "Khmer"),
    (0x10A0, 0x10FF, "Georgian"),
    (0x1100, 0x11FF, "Hangul"),
    (0x3130, 0x318F, "Hangul"),
    (0xAC00, 0xD7AF, "Hangul"),
    (0x3040, 0x309F, "Kana"),
    (0x30A0, 0x30FF, "Kana"),
    (0x31F0, 0x31FF, "Kana"),
    (0xFF66, 0xFF9F, "Kana"),
    (0x3400, 0x4DBF, "Han"),
    (0x4E00, 0x9FFF, "Han"),
    (0xF900, 0xFAFF, "Han"),
    (0x20000, 0x2FA1F, "Han"),
)
# A script that names one language (Han is decided below, with kana).
SCRIPT_LANGUAGE = {
    "Hangul": "ko",
    "Kana": "ja",
    "Han": "zh",
    "Greek": "el",
    "Hebrew": "he",
    "Armenian": "hy",
    "Georgian": "ka",
    "Thai": "th",
}


@lru_cache(maxsize=65536)
def _script_of(char: str) -> str | None:
    """The script of one character (None: not a letter); cached, a text repeats its letters."""
    cp = ord(char)
    for low, high, name in _SCRIPT_RANGES:
        if low <= cp <= high:
            return name if name != "Latin" or char.isalpha() else None
    return "Other" if char.isalpha() else None


def script_counts(text: str | None) -> dict[str, int]:
    """Letters of `text` per script (Latin, Cyrillic, Han, Kana, Hangul, ..., Other).

    Counted per distinct character (`Counter` runs in C), not per character: 5x faster."""
    counts: dict[str, int] = {}
    for char, n in Counter(text or "").items():
        script = _script_of(char)
        if script is not None:
            counts[script] = counts.get(script, 0) + n
    return counts


def dominant_script(text: str | None) -> str:
    """The script most letters of `text` are in: Latin, Cyrillic, Arabic, Hangul, Han, Kana, ...

    Japanese mixes Han and kana: text whose largest group is Han+kana is "Kana" when kana are at
    least 10% of it, else "Han". "None" when the text has no letters.
    """
    counts = script_counts(text)
    if not counts:
        return "None"
    cjk = counts.get("Han", 0) + counts.get("Kana", 0)
    best = max(counts, key=lambda s: counts[s])
    if cjk >= counts[best]:
        return "Kana" if counts.get("Kana", 0) >= 0.1 * cjk else "Han"
    return best


# --- the script rule -----------------------------------------------------------------------------

# A Han character carries about a word, a kana or Hangul character about a syllable.
SCRIPT_WEIGHT = {"Han": 3, "Kana": 2, "Hangul": 2}
SCRIPT_FAMILY = {"Kana": "Han"}  # Japanese mixes kana and Han: never a mismatch between them
SCRIPT_MIN_SHARE = 0.6  # of a side's weighted letters in its dominant script; below: mixed text
# Each side's dominant script must be (nearly) absent from the other side: a Chinese user who
# pastes unfenced code or logs, or an English answer with a Chinese term, is not a mismatch.
SCRIPT_MAX_CROSS_SHARE = 0.1

# An instruction that asks for another language: translating, a language named, "in Chinese".
# English plus the words for "translate" / the language names in the scripts the rule compares.
_ASKS_FOR_LANGUAGE = re.compile(
    r"translat|transliterat|romani[sz]|pinyin|romaji|\blanguages?\b|"
    r"\b(?:english|chinese|mandarin|cantonese|japanese|korean|russian|ukrainian|belarusian|"
    r"bulgarian|serbian|macedonian|kazakh|mongolian|greek|hebrew|yiddish|arabic|persian|farsi|"
    r"urdu|pashto|hindi|marathi|nepali|sanskrit|bengali|bangla|punjabi|gujarati|tamil|telugu|"
    r"kannada|malayalam|sinhala|thai|lao|burmese|khmer|georgian|armenian|amharic|french|german|"
    r"spanish|portuguese|italian|dutch|polish|czech|turkish|vietnamese|indonesian|latin)\b|"
    r"翻译|翻譯|译|譯|訳|中文|汉语|漢語|英文|英语|英語|日语|日語|日本語|韩语|韓語|한국어|영어|번역|"
    r"перев|английск|русск|язык|ترجم|عربي|إنجليز|انگلیس|अनुवाद|अंग्रेज़?ी|हिंदी|हिन्दी|แปล|ภาษา|"
    r"μετάφρ|αγγλικ|ελληνικ|תרגם|תרגום|אנגלית|עברית",
    re.I,
)


@dataclass(frozen=True)
class ScriptProfile:
    script: str  # the dominant script (kana folded into Han); "None" without letters
    share: float  # its share of the side's weighted letters
    weight: float  # the side's weighted letters
    shares: tuple[tuple[str, float], ...] = ()  # every script's share, largest first

    def share_of(self, script: str) -> float:
        return dict(self.shares).get(script, 0.0)


def script_profile(cleaned: str) -> ScriptProfile:
    """The dominant script of already-cleaned text, weighted (see the module docstring)."""
    weights: dict[str, float] = {}
    for script, count in script_counts(cleaned).items():
        family = SCRIPT_FAMILY.get(script, script)
        weights[family] = weights.get(family, 0.0) + count * SCRIPT_WEIGHT.get(script, 1)
    total = sum(weights.values())
    if not total:
        return ScriptProfile("None", 0.0, 0.0)
    ranked = sorted(weights, key=lambda s: (-weights[s], s))  # name order breaks ties
    shares = tuple((s, weights[s] / total) for s in ranked)
    return ScriptProfile(ranked[0], shares[0][1], total, shares)


def asks_for_language(instruction: str | None) -> bool:
    """The instruction names a language or asks for a translation: a mismatch is expected."""
    return bool(instruction) and _ASKS_FOR_LANGUAGE.search(instruction) is not None


def is_script_mismatch(
    instruction: ScriptProfile, response: ScriptProfile, min_weight: float, exempt: bool
) -> bool:
    """Both sides clearly in one known script each, and the two scripts differ."""
    if exempt or "None" in (instruction.script, response.script):
        return False
    if "Other" in (instruction.script, response.script):
        return False  # a letter outside every known range: too little known to flag
    if min(instruction.weight, response.weight) < min_weight:
        return False
    if min(instruction.share, response.share) < SCRIPT_MIN_SHARE:
        return False
    if instruction.script == response.script:
        return False
    return (
        response.share_of(instruction.script) < SCRIPT_MAX_CROSS_SHARE
        and instruction.share_of(response.script) < SCRIPT_MAX_CROSS_SHARE
    )


# --- the detector --------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _detector(languages: tuple[str, ...] | None, low_accuracy: bool) -> Any:
    """One lingua detector per (language list, mode) per process: building it is the costly part."""
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    if languages:
        codes = [getattr(IsoCode639_1, code.upper()) for code in languages]
        builder = (
            LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
            if len(codes) > 1
            else LanguageDetectorBuilder.from_all_languages()
        )
    else:
        builder = LanguageDetectorBuilder.from_all_languages()
    if low_accuracy:
        builder = builder.with_low_accuracy_mode()
    return builder.build()


def supported_languages() -> list[str]:
    """ISO 639-1 codes lingua knows (a language list is checked against these)."""
    from lingua import Language

    return sorted(lang.iso_code_639_1.name.lower() for lang in Language.all())


def _languages_key(languages: Iterable[str] | None) -> tuple[str, ...] | None:
    if not languages:
        return None
    key = tuple(sorted({code.lower() for code in languages}))
    unknown = sorted(set(key) - set(supported_languages()))
    if unknown:
        raise ValueError(f"lingua does not support languages {unknown}")
    return key


@dataclass(frozen=True)
class Detection:
    lang: str
    confidence: float


def _confidences(detector: Any, texts: list[str], parallel: bool) -> list[dict[str, float]]:
    if not texts:
        return []
    if parallel:
        ranked_all = detector.compute_language_confidence_values_in_parallel(texts)
    else:
        ranked_all = [detector.compute_language_confidence_values(text) for text in texts]
    return [{v.language.iso_code_639_1.name.lower(): v.value for v in r} for r in ranked_all]


def detect_languages(
    texts: Sequence[str | None],
    languages: Iterable[str] | None = None,
    min_chars: int = 12,
    max_chars: int = DEFAULT_MAX_CHARS,
    accuracy: str = "auto",
    parallel: bool = False,
    cleaned: Sequence[str] | None = None,
) -> list[Detection]:
    """The language of each text (ISO 639-1, or "und" with NaN confidence).

    `accuracy`: "auto" (high-accuracy detector for texts under LONG_TEXT_CHARS, low for longer
    ones), "high" or "low". `parallel` uses lingua's own thread pool (all cores): right for one
    process, wrong inside a Spark task, where every core already runs a task. `cleaned`: the
    texts already through `clean_text(text, max_chars)`, when the caller has them.
    """
    if accuracy not in ACCURACY_MODES:
        raise ValueError(f"accuracy must be one of {ACCURACY_MODES}, got {accuracy!r}")
    key = _languages_key(languages)
    allowed = set(key) if key else None
    if cleaned is None:
        cleaned = [clean_text(t, max_chars) for t in texts]
    todo = [i for i, c in enumerate(cleaned) if letter_count(c) >= min_chars]
    results = [Detection(UNDETERMINED, math.nan)] * len(texts)
    if accuracy == "auto":
        long_ = [i for i in todo if len(cleaned[i]) >= LONG_TEXT_CHARS]
        short = [i for i in todo if len(cleaned[i]) < LONG_TEXT_CHARS]
        groups = [(short, False), (long_, True)]
    else:
        groups = [(todo, accuracy == "low")]
    for indices, low in groups:
        if not indices:
            continue
        batch = [cleaned[i] for i in indices]
        scored = _confidences(_detector(key, low), batch, parallel)
        for i, text, scores in zip(indices, batch, scored, strict=True):
            best = max(scores, key=lambda code: scores[code]) if scores else None
            lang = best if best is not None and scores[best] > 0 else UNDETERMINED
            script_lang = SCRIPT_LANGUAGE.get(dominant_script(text))
            if script_lang and lang != script_lang and (allowed is None or script_lang in allowed):
                # The script settles it (e.g. lingua's kana-less Han called Japanese).
                lang = script_lang
                scores[lang] = max(scores.get(lang, 0.0), 0.99)
            if lang != UNDETERMINED:
                results[i] = Detection(lang, float(scores[lang]))
    return results


def side_texts(conversation: Sequence[dict[str, Any]] | None) -> tuple[str, str]:
    """(all user turns, all assistant turns) of a canonical conversation, bad turns skipped."""
    user: list[str] = []
    assistant: list[str] = []
    for turn in conversation or ():
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            continue
        if turn.get("role") == "user":
            user.append(turn["content"])
        elif turn.get("role") == "assistant":
            assistant.append(turn["content"])
    return "\n\n".join(user), "\n\n".join(assistant)


def is_mismatch(instruction: Detection, response: Detection, min_confidence: float) -> bool:
    """Both sides determined and confident, and in different languages."""
    if UNDETERMINED in (instruction.lang, response.lang):
        return False
    if not (instruction.confidence >= min_confidence and response.confidence >= min_confidence):
        return False
    return instruction.lang != response.lang


def lang_table(
    ids: Sequence[str],
    conversations: Sequence[Sequence[dict[str, Any]] | None],
    languages: Iterable[str] | None = None,
    min_chars: int = 12,
    min_confidence: float = 0.5,
    max_chars: int = DEFAULT_MAX_CHARS,
    accuracy: str = "auto",
    parallel: bool = False,
    by_script: bool = True,
) -> pa.Table:
    """LANG_SCHEMA rows for records: both sides detected in one detector call."""
    sides = [side_texts(c) for c in conversations]
    texts = [s[0] for s in sides] + [s[1] for s in sides]
    cleaned = [clean_text(t, max_chars) for t in texts]
    detected = detect_languages(
        texts,
        languages,
        min_chars=min_chars,
        max_chars=max_chars,
        accuracy=accuracy,
        parallel=parallel,
        cleaned=cleaned,
    )
    n = len(sides)
    instruction, response = detected[:n], detected[n:]
    profiles = [script_profile(c) for c in cleaned]
    script = [
        is_script_mismatch(profiles[i], profiles[n + i], min_chars, asks_for_language(s[0]))
        if (s[0] or s[1])
        else None
        for i, s in enumerate(sides)
    ]
    mismatch = [
        (is_mismatch(a, b, min_confidence) or (by_script and bool(by))) if (s[0] or s[1]) else None
        for a, b, by, s in zip(instruction, response, script, sides, strict=True)
    ]
    return pa.Table.from_pydict(
        {
            "id": list(ids),
            "lang": [d.lang for d in instruction],
            "lang_confidence": [d.confidence for d in instruction],
            "response_lang": [d.lang for d in response],
            "response_lang_confidence": [d.confidence for d in response],
            "lang_mismatch": mismatch,
            "script_mismatch": script,
        },
        schema=LANG_SCHEMA,
    )
