"""`openai` judge backend: any OpenAI-compatible chat endpoint (`vllm serve`, a commercial API).

Each prompt (chat messages; a `RawPrompt` is refused with TypeError) is one POST
{base_url}/chat/completions with temperature 0 and `max_tokens`; with
`logprobs` on it also asks for `logprobs: true, top_logprobs: 20`, and the score tokens' log-
probabilities are read from the first generated position (choices[0].logprobs.content[0]
.top_logprobs; token strings are stripped of surrounding whitespace, so " 4" and "4" are one
score token, and the larger log-probability of such variants is kept). A score token the endpoint
did not list among its top 20 is absent from `score_logprobs` (it is less likely than all of
them); `score_logprobs` is None when the endpoint gave no log-probabilities. An endpoint that
rejects the parameter (HTTP 400) is asked once more without it; when that works, the rest of the
run goes without log-probabilities.

Requests run on a thread pool of `concurrency` threads sharing one HTTP connection pool. Each
attempt has a timeout; 429, 5xx, connection errors, timeouts and malformed replies are retried
with exponential backoff and jitter (a Retry-After header, in seconds or as an HTTP date,
is a lower bound on the wait); any other 4xx is not retried and raises `JudgeRequestError`
naming the URL and status, except a prompt the server refuses as longer than the model's window
(400/413/422 saying so): that prompt gets an empty reply (NaN / judge_unparsed downstream, as the
other backends do), counted in `rejected` and not cached. The API key goes only into the
Authorization header: it is masked in every error and never stored.

Request cache: one small JSON file per request, `<dir>/<key[:2]>/<key>.json`, where the key is
the sha256 of the request body without the base URL (model, messages, temperature, max_tokens,
logprobs, top_logprobs), so the same model behind another address reuses the answers. A file is
written to a temporary name in the same folder and renamed into place (atomic on POSIX): a
reader never sees half a reply, a crash loses only requests still in flight, concurrent writers
(threads, Ray actors, processes on a shared file system) need no lock, and a key written twice
holds one reply, never two. An append-only JSONL shard would be fewer files but needs a lock or a
de-duplicating read, and a torn last line after a crash. The file keeps the reply text, the
finish reason and the whole top-20 list of the first position, so judges with other score tokens
reuse it. An interrupted run asks only what has no file yet; within one call identical prompts are
asked once.

Counters for the stage's manifest: `requests` (HTTP attempts), `replies` (answers received and
stored), `retries`, `cache_hits`, `deduplicated`, `logprobs_fallbacks`, `rejected`.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from engine.backends.base import Closable, JudgeReply, Prompt, RawPrompt

log = logging.getLogger(__name__)

TOP_LOGPROBS = 20
# How servers say a prompt does not fit the model's window (vLLM, OpenAI, TGI, llama.cpp).
TOO_LONG = re.compile(
    r"context.length|context.window|too long|max_model_len|maximum (model|input) length"
    r"|exceeds? the (available )?context|input_tokens|too many tokens",
    re.IGNORECASE,
)
RETRY_AFTER_MAX_S = 300.0
# Bump when the cached reply's layout changes (old files are then simply not found).
CACHE_FORMAT = 1


@dataclass(frozen=True)
class OpenAIEndpoint:
    """Where and how the `openai` judge backend asks: the endpoint's settings from the job spec.
    `api_key` is the key itself (the caller reads it from the environment variable the spec
    names; it is never stored anywhere else); `model` None means the stage's model name;
    `request_cache_dir` None switches the request cache off."""

    base_url: str
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 6
    logprobs: bool = True
    request_cache_dir: str | None = None


class JudgeRequestError(RuntimeError):
    """A request the endpoint refused for good (a 4xx other than 429), or that kept failing."""

    def __init__(self, message: str, url: str, status: int | None, too_long: bool = False) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.too_long = too_long


class _Retryable(Exception):
    """One attempt failed in a way that is worth another try."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class CachedReply:
    """What is kept of one chat completion: enough to rebuild any judge's reply."""

    text: str
    finish_reason: str | None
    top_logprobs: list[tuple[str, float]] | None  # first generated position; None: not given

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "top_logprobs": None
            if self.top_logprobs is None
            else [list(t) for t in self.top_logprobs],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CachedReply:
        top = data.get("top_logprobs")
        return cls(
            text=str(data.get("text") or ""),
            finish_reason=data.get("finish_reason"),
            top_logprobs=None if top is None else [(str(t), float(lp)) for t, lp in top],
        )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


def parse_completion(body: Any) -> CachedReply:
    """The reply text and first-position top log-probabilities of a chat completion body.
    Raises ValueError when the body is not a chat completion."""
    try:
        choice = body["choices"][0]
        message = choice.get("message") or {}
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError("no choices[0] in the reply") from error
    text = message.get("content") or ""
    if not isinstance(text, str):
        raise ValueError("choices[0].message.content is not a string")
    top: list[tuple[str, float]] | None = None
    content = (choice.get("logprobs") or {}).get("content")
    if content:
        first = content[0] or {}
        entries = first.get("top_logprobs") or []
        top = [
            (str(e["token"]), float(e["logprob"]))
            for e in entries
            if isinstance(e, dict) and e.get("token") is not None and e.get("logprob") is not None
        ]
        if not top and first.get("token") is not None and first.get("logprob") is not None:
            top = [(str(first["token"]), float(first["logprob"]))]
    return CachedReply(text=text, finish_reason=choice.get("finish_reason"), top_logprobs=top)


def score_logprobs(
    top_logprobs: Sequence[tuple[str, float]] | None, score_tokens: Sequence[str]
) -> dict[str, float] | None:
    """Log-probability of each score token among the top alternatives: token strings stripped of
    surrounding whitespace, the largest log-probability kept per score token; tokens not listed
    are left out. None when there were no log-probabilities at all."""
    if top_logprobs is None:
        return None
    wanted = {t.strip() for t in score_tokens}
    out: dict[str, float] = {}
    for token, logprob in top_logprobs:
        key = token.strip()
        if key in wanted and (key not in out or logprob > out[key]):
            out[key] = logprob
    return out


class OpenAIJudge(Closable):
    """`JudgeBackend` on an OpenAI-compatible endpoint (see the module docstring)."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        logprobs: bool = True,
        max_new_tokens: int = 8,
        request_cache_dir: str | Path | None = None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.logprobs = logprobs
        self.max_new_tokens = max_new_tokens
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.cache_dir = Path(request_cache_dir) if request_cache_dir is not None else None
        self._api_key = api_key or None
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.requests = 0
        self.replies = 0
        self.retries = 0
        self.cache_hits = 0
        self.deduplicated = 0
        self.logprobs_fallbacks = 0
        self.rejected = 0

    # -- public ------------------------------------------------------------------------------

    def judge(self, prompts: Sequence[Prompt], score_tokens: Sequence[str]) -> list[JudgeReply]:
        """One reply per prompt, in order; cached replies are not asked again. Chat messages
        only: a `RawPrompt` (DEITA's raw template) needs the model's own tokenizer, which a
        chat endpoint does not expose (the stage refuses that setting before any request)."""
        self._check_open()
        if not prompts:
            return []
        if any(isinstance(p, RawPrompt) for p in prompts):
            raise TypeError(
                "the openai judge backend takes chat messages only, not raw prompts "
                "(stages.judge.deita.prompt_style: raw needs backend transformers or vllm)"
            )
        first_of: dict[str, int] = {}
        keys: list[str] = []
        for i, messages in enumerate(prompts):
            key = self.cache_key(messages, self.logprobs)
            keys.append(key)
            first_of.setdefault(key, i)
        with self._lock:
            self.deduplicated += len(prompts) - len(first_of)
        unique = list(first_of.values())
        answers: dict[int, CachedReply] = {}
        self._stop.clear()
        if len(unique) == 1 or self.concurrency == 1:
            for i in unique:
                answers[i] = self._answer(prompts[i])
        else:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="openai-judge") as pool:
                futures = {pool.submit(self._answer, prompts[i]): i for i in unique}
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    # Stop starting new requests; those in flight finish (and are cached).
                    self._stop.set()
                    for future in futures:
                        future.cancel()
                    wait(futures)
                    raise failed[0].exception()  # type: ignore[misc]
                for future, i in futures.items():
                    answers[i] = future.result()
        return [
            JudgeReply(
                text=answers[first_of[key]].text,
                score_logprobs=score_logprobs(answers[first_of[key]].top_logprobs, score_tokens),
            )
            for key in keys
        ]

    def counters(self) -> dict[str, int]:
        """Request statistics for the stage's manifest."""
        with self._lock:
            return {
                "requests": self.requests,
                "replies": self.replies,
                "retries": self.retries,
                "cache_hits": self.cache_hits,
                "deduplicated": self.deduplicated,
                "logprobs_fallbacks": self.logprobs_fallbacks,
                "rejected": self.rejected,
            }

    @classmethod
    def from_endpoint(
        cls, endpoint: OpenAIEndpoint, model: str, max_new_tokens: int = 8
    ) -> OpenAIJudge:
        """A client of `endpoint`; `model` is the served model's name when the endpoint names
        none."""
        return cls(
            base_url=endpoint.base_url,
            model=endpoint.model or model,
            api_key=endpoint.api_key,
            concurrency=endpoint.concurrency,
            timeout_s=endpoint.timeout_s,
            max_retries=endpoint.max_retries,
            logprobs=endpoint.logprobs,
            max_new_tokens=max_new_tokens,
            request_cache_dir=endpoint.request_cache_dir,
        )

    def _release(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()

    # -- requests ----------------------------------------------------------------------------

    def request_body(self, messages: list[dict[str, str]], logprobs: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "temperature": 0,
            "max_tokens": self.max_new_tokens,
        }
        if logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = TOP_LOGPROBS
        return body

    def cache_key(self, messages: list[dict[str, str]], logprobs: bool) -> str:
        """sha256 of the request body (no base URL, no key)."""
        text = json.dumps(
            self.request_body(messages, logprobs),
            sort_keys=True,
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def _cache_read(self, key: str) -> CachedReply | None:
        path = self._cache_path(key)
        if path is None:
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("unreadable request-cache file %s: asking again", path)
            return None
        if data.get("format") != CACHE_FORMAT:
            return None
        return CachedReply.from_json(data)

    def _cache_write(self, key: str, reply: CachedReply) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(reply.to_json(), handle, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _answer(self, messages: list[dict[str, str]]) -> CachedReply:
        """The cached reply for `messages`, else ask the endpoint (and cache what it says)."""
        logprobs = self.logprobs
        key = self.cache_key(messages, logprobs)
        cached = self._cache_read(key)
        if cached is not None:
            with self._lock:
                self.cache_hits += 1
            return cached
        try:
            reply = self._post(self.request_body(messages, logprobs))
        except JudgeRequestError as error:
            if error.too_long:
                return self._rejected(error)
            if not (logprobs and error.status == 400):
                raise
            # Maybe the endpoint does not take logprobs: ask once more without them.
            key = self.cache_key(messages, False)
            cached = self._cache_read(key)
            if cached is not None:
                with self._lock:
                    self.cache_hits += 1
                    self._disable_logprobs()
                return cached
            try:
                reply = self._post(self.request_body(messages, False))
            except JudgeRequestError as second:
                if second.too_long:
                    return self._rejected(second)
                raise
            with self._lock:
                self._disable_logprobs()
        self._cache_write(key, reply)
        with self._lock:
            self.replies += 1
        return reply

    def _rejected(self, error: JudgeRequestError) -> CachedReply:
        """A prompt longer than the served model's window: an empty reply (the judge makes it
        NaN / judge_unparsed), not cached, so a later run with a longer window asks again."""
        with self._lock:
            self.rejected += 1
        log.warning("%s: prompt rejected as too long (HTTP %s)", self.url, error.status)
        return CachedReply(text="", finish_reason="rejected", top_logprobs=None)

    def _disable_logprobs(self) -> None:
        """Called with the lock held, after a request without logprobs worked."""
        if self.logprobs:
            self.logprobs = False
            self.logprobs_fallbacks += 1
            log.warning(
                "%s refused logprobs (HTTP 400); judging without log-probabilities", self.url
            )

    def _mask(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _backoff_s(self, attempt: int, retry_after_s: float | None) -> float:
        # "Equal jitter": at least half the exponential step, so the total wait before giving
        # up is predictable (>= about max_retries x backoff_max_s / 2 once the cap is reached),
        # and clients that failed together do not come back together.
        step = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        delay = step / 2 + random.uniform(0, step / 2)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return delay

    def _post(self, body: dict[str, Any]) -> CachedReply:
        """POST one chat completion with retries; the parsed reply or an error."""
        self._check_open()
        client = self._client
        last = ""
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                raise JudgeRequestError(
                    f"stopped: another request to {self.url} failed", self.url, None
                )
            if attempt:
                with self._lock:
                    self.retries += 1
            with self._lock:
                self.requests += 1
            try:
                return self._attempt(client, body)
            except _Retryable as error:
                last = error.reason
                if attempt == self.max_retries:
                    break
                delay = self._backoff_s(attempt, error.retry_after_s)
                log.info(
                    "%s: %s; retry %d/%d in %.1f s",
                    self.url,
                    error.reason,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                if self._stop.wait(delay):
                    continue  # the loop raises at the top
        raise JudgeRequestError(
            f"{self.url} failed after {self.max_retries + 1} attempts: {self._mask(last)}",
            self.url,
            None,
        )

    def _attempt(self, client: httpx.Client, body: dict[str, Any]) -> CachedReply:
        try:
            response = client.post(self.url, json=body)
        except httpx.TimeoutException as error:
            raise _Retryable(
                f"timeout after {self.timeout_s:g} s ({type(error).__name__})"
            ) from None
        except httpx.TransportError as error:
            raise _Retryable(
                f"connection error ({type(error).__name__}: {self._mask(str(error))})"
            ) from None
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Retryable(
                f"HTTP {status}", parse_retry_after(response.headers.get("retry-after"))
            )
        if status != 200:
            detail = self._mask(response.text[:500])
            raise JudgeRequestError(
                f"{self.url} answered HTTP {status} (not retried): {detail}",
                self.url,
                status,
                too_long=status in (400, 413, 422) and bool(TOO_LONG.search(response.text)),
            )
        try:
            return parse_completion(response.json())
        except ValueError as error:  # includes JSON decode errors: a truncated body
            raise _Retryable(f"malformed reply ({error})") from None
