"""An API key from the environment never reaches an output: run dir, caches, logs, CLI output.

A real `winnow select` subprocess (its own Spark and Ray, Ray's temp folder inside the test's own
folder so its session logs are searched too) runs the AlpaGasus judge with the `openai` backend
against a scripted local HTTP endpoint (tests/test_judge_openai.py's server), the key planted in
`OPENAI_API_KEY`, the variable the endpoint's `api_key_env` names by default. Once the endpoint
answers, once it refuses with 401 and echoes the key in its error body, as some APIs do. After
each run every file under the run directory, the Winnow cache (score cache, request cache,
converted models), Ray's temp folder and the CLI's stdout/stderr is searched for the key, raw
and base64-encoded (at the three byte alignments, so it is found inside a longer encoded blob).
The positive control: the server received the key in its Authorization header.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_judge_openai import Scripted, completion, endpoint  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 240
ROWS = 6
TOP = [("5", -0.2), ("4", -1.8), ("3", -3.0)]


def encodings(key: str) -> list[bytes]:
    """The key raw and as any base64 text that contains it: each of the 3 byte offsets."""
    raw = key.encode()
    forms = [raw]
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + raw)
        # drop the characters that mix in the padding bytes or the unknown bytes after the key
        start = (pad * 4 + 2) // 3
        forms.append(encoded[start : len(encoded) - 4])
    return forms


def test_encodings_find_the_key_inside_longer_base64() -> None:
    """The search catches a key base64-encoded inside other data, whatever its alignment."""
    key = f"sk-winnow-test-{secrets.token_hex(8)}"
    for prefix in (b"", b"a", b"ab", b"abc"):
        blob = base64.b64encode(prefix + f"Bearer {key}\n".encode() + b"tail")
        assert any(form in blob for form in encodings(key)[1:]), prefix
    assert not any(form in base64.b64encode(b"sk-winnow-test-other") for form in encodings(key))


def _leaks(key: str, roots: list[Path], streams: dict[str, bytes]) -> list[str]:
    """Every file under `roots` and every stream that holds the key in any of its forms."""
    forms = encodings(key)
    found = [name for name, data in streams.items() if any(f in data for f in forms)]
    scanned = 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                scanned += 1
                data = path.read_bytes()
                if any(f in data for f in forms):
                    found.append(str(path))
    assert scanned > 10, f"only {scanned} files under {roots}"
    return found


@pytest.fixture
def workspace() -> Iterator[Path]:
    """A short folder of our own (Ray's socket paths must stay under 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="wsec-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _select(
    work: Path, url: str, key: str, rows: list[dict], served: str
) -> tuple[subprocess.CompletedProcess[bytes], Path, float]:
    """`winnow select --signals judge.alpagasus` with the openai backend against `url`."""
    data = work / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows[:ROWS]), encoding="utf-8")
    job = {
        "stages": {
            "judge": {
                "backend": "openai",
                "scoring": "expected",
                "openai": {"model": served},
                "resources": {
                    "num_cpus": 0.5,
                    "endpoint": {"base_url": url, "concurrency": 2, "max_retries": 1},
                },
                "cache": {"dir": str(work / "scores")},
            }
        }
    }
    config = work / "job.yaml"
    config.write_text(yaml.safe_dump(job), encoding="utf-8")
    out = work / "run"
    env = {
        **os.environ,
        "OPENAI_API_KEY": key,
        "WINNOW_CACHE": str(work / "cache"),
        "HF_HOME": str(work / "cache" / "hf"),
        "HF_HUB_OFFLINE": "1",
        "RAY_TMPDIR": str(work / "ray"),
    }
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray of its own
    command = [sys.executable, "-m", "engine", "select", str(data), "--out", str(out)]
    command += ["--signals", "judge.alpagasus", "--budget", "3", "--dedup", "none"]
    command += ["--config", str(config)]
    start = time.monotonic()
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, timeout=RUN_TIMEOUT_S, check=False
    )
    return done, out, time.monotonic() - start


def _sent(script: Scripted, key: str) -> int:
    """How many requests carried the key (the positive control: it did go out)."""
    return sum(h.get("Authorization") == f"Bearer {key}" for h in script.headers)


@pytest.mark.slow
def test_api_key_reaches_the_endpoint_and_no_output(
    endpoint: tuple[str, Scripted],  # noqa: F811
    workspace: Path,
    alpaca_rows: list[dict],
) -> None:
    """Two `winnow select` runs in one run directory: the endpoint answers the first; it refuses
    the second (another served model, so the judge stage runs again while ingest is reused)
    with a 401 that quotes the key in its body and a header. Both keys are searched for
    everywhere after each run."""
    url, script = endpoint
    good, bad = (f"sk-winnow-test-{secrets.token_hex(16)}" for _ in range(2))

    def respond(body: dict[str, Any], n: int) -> tuple[int, dict[str, str], Any, float]:
        if body["model"] == "good":
            return 200, {}, completion("5", TOP), 0.0
        error = {"message": f"Incorrect API key provided: {bad}.", "code": "invalid_api_key"}
        return 401, {"WWW-Authenticate": f'Bearer realm="{bad}"'}, {"error": error}, 0.0

    script.respond = respond
    done, out, seconds = _select(workspace, url, good, alpaca_rows, "good")
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")[-3000:]
    assert _sent(script, good) == ROWS
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["signals"]["judge"]["backend"] == "openai"
    assert (out / "report.html").is_file() and any((workspace / "cache").rglob("*.json"))
    assert any((out / "logs").iterdir()) and any((workspace / "ray").rglob("*.log"))
    assert not _leaks(good, [workspace], {"stdout": done.stdout, "stderr": done.stderr})
    print(f"answered run: {seconds:.1f} s; stages: {manifest['timings_s']}")

    done, out, seconds = _select(workspace, url, bad, alpaca_rows, "refused")
    text = (done.stderr + done.stdout).decode("utf-8", "replace")
    assert done.returncode != 0 and "401" in text, text[-3000:]
    assert _sent(script, bad) >= 1
    streams = {"stdout": done.stdout, "stderr": done.stderr}
    assert not _leaks(bad, [workspace], streams) and not _leaks(good, [workspace], streams)
    print(f"refused run: {seconds:.1f} s; {_sent(script, bad)} requests with its key")
