"""The run directory: where every stage writes, and how a re-run knows what is already done.

A stage is complete when its marker (`_stages/<name>.json`) exists; the marker is written after the
stage's data, so a crash mid-stage leaves no marker and the stage runs again. The marker holds a
fingerprint of the stage's inputs (its config and its upstream fingerprints): a changed config
re-runs that stage and everything downstream of it.

A marker is trusted only as far as the files it vouches for (`RunDir.completion`): it lists the
stage's output files with their sizes (and Parquet row counts), and before a stage is skipped
every output is checked again: each Parquet footer opens, JSON/JSONL parses, nothing recorded is
missing or changed size. Disks fill, copies get cut short and people delete things; a damaged
output named in the log and re-computed is cheap, one read as data is not. A marker that is
itself unreadable counts as absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once: os.umask can only be read by setting it


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` only if the block ends
    without an error, so a reader never sees half a file and a crash leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file 0600; an output is as readable as any file the user creates.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """An open file whose content replaces `path` atomically when the block ends (atomic_path)."""
    encoding = None if "b" in mode else "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader never sees half a file."""
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")


def fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class RunDir:
    """Paths of one run's outputs plus stage markers."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # Public outputs (the contract users rely on).
    @property
    def selected(self) -> Path:
        return self.root / "selected.jsonl"

    @property
    def random_baseline(self) -> Path:
        return self.root / "random_baseline.jsonl"

    @property
    def scores(self) -> Path:
        return self.root / "scores.parquet"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.jsonl"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    # Intermediate data, one way: records -> signals/<name> -> selection.
    @property
    def records(self) -> Path:
        return self.root / "records"

    @property
    def logs(self) -> Path:
        """Spark's, Ray's and the model libraries' logs (the console shows progress only)."""
        return self.root / "logs"

    @property
    def evaluation(self) -> Path:
        """The `eval:` stages' outputs: models/, train/, answers/, judgements/, results.json."""
        return self.root / "eval"

    def signal(self, name: str) -> Path:
        return self.root / "signals" / name

    def work(self, name: str) -> Path:
        return self.root / "_work" / name

    def _marker(self, stage: str) -> Path:
        return self.root / "_stages" / f"{stage}.json"

    def completed(
        self, stage: str, stage_fingerprint: str, outputs: list[Path] | None = None
    ) -> dict[str, Any] | None:
        """The marker's payload if `stage` finished with this fingerprint and its outputs are
        still there and sound (`completion`), else None."""
        return self.completion(stage, stage_fingerprint, outputs).marker

    def completion(
        self, stage: str, stage_fingerprint: str, outputs: list[Path] | None = None
    ) -> Completion:
        """Whether `stage` is complete for this fingerprint, and if a marker says so but cannot
        be trusted, why (a damaged marker, a damaged or missing output: `verify_outputs`)."""
        marker = self._marker(stage)
        if not marker.is_file():
            return Completion(None)
        try:
            payload = json.loads(marker.read_text(encoding="utf-8"))
            if not isinstance(payload, dict):
                raise ValueError(f"a JSON {type(payload).__name__}, not an object")
        except (OSError, ValueError) as exc:
            return Completion(None, [Damage(self._relative(marker), f"is damaged ({_why(exc)})")])
        if payload.get("fingerprint") != stage_fingerprint:
            return Completion(None)  # other settings: not damage, just another stage's state
        recorded = payload.get("outputs")
        damage = verify_outputs(
            self.root, outputs or [], recorded if isinstance(recorded, dict) else None
        )
        return Completion(None if damage else payload, damage)

    def mark_done(
        self,
        stage: str,
        stage_fingerprint: str,
        info: dict[str, Any],
        outputs: list[Path] | None = None,
    ) -> None:
        """Write the marker (after the data). With `outputs`, the marker also lists every file
        under them with its size and Parquet row count, which `completion` checks again."""
        payload: dict[str, Any] = {"fingerprint": stage_fingerprint, **info}
        if outputs is not None:
            payload["outputs"] = output_inventory(self.root, outputs)
        write_json_atomic(self._marker(stage), payload)

    def _relative(self, path: Path) -> str:
        return _relative(self.root, path)

    def clear(self, stage: str) -> None:
        self._marker(stage).unlink(missing_ok=True)

    def write_sidecar(self, name: str, table: Any) -> Path:
        """A signal stage's sidecar `signals/<name>/`, replacing any earlier one."""
        import pyarrow.parquet as pq

        folder = self.reset_dir(self.signal(name))
        pq.write_table(table, folder / "part-00000.parquet")
        return folder

    @staticmethod
    def remove(*paths: Path) -> None:
        """Drop intermediate folders once their stage no longer needs them."""
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def reset_dir(path: Path) -> Path:
        """Empty a stage's output folder so a redo never appends to old shards."""
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path


# -- Verifying a stage's outputs before it is skipped ------------------------------------------


@dataclass(frozen=True)
class Damage:
    """One output that cannot be trusted: its path (relative to the run directory) and why."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path} {self.problem}"


@dataclass(frozen=True)
class Completion:
    """`RunDir.completion`: the marker of a complete stage (None: it runs), and what was found
    damaged when a marker was there but could not be trusted."""

    marker: dict[str, Any] | None
    damage: list[Damage] | None = None

    def describe(self, stage: str) -> str | None:
        """The log line for a damaged stage ("lm: signals/lm/x.parquet is damaged (...) —
        re-running lm"), or None when nothing was damaged."""
        if not self.damage:
            return None
        first = self.damage[0]
        more = f" (and {len(self.damage) - 1} more)" if len(self.damage) > 1 else ""
        return f"{stage}: {first}{more} — re-running {stage}"


def _relative(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _visible(path: Path, root: Path) -> bool:
    """Data files only: Spark's `_SUCCESS`, `.crc` files and our `.x.tmp` temp files are not."""
    return not any(part.startswith((".", "_")) for part in path.relative_to(root).parts)


def output_files(outputs: Iterable[Path]) -> Iterator[Path]:
    """Every data file under `outputs` (a file output is itself), in a stable order."""
    for output in outputs:
        if output.is_file():
            yield output
        elif output.is_dir():
            yield from sorted(p for p in output.rglob("*") if p.is_file() and _visible(p, output))


def parquet_rows(path: Path) -> int:
    """The row count from the Parquet footer; raises (OSError, ArrowInvalid) when the footer
    cannot be read: a truncated file, or not Parquet at all."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _last_line(path: Path, chunk: int = 1 << 16) -> str:
    """The last non-blank line of a text file, read from its end."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        data = b""
        while size > 0:
            step = min(chunk, size)
            size -= step
            handle.seek(size)
            data = handle.read(step) + data
            lines = data.rstrip(b"\n\r").rsplit(b"\n", 1)
            if len(lines) == 2 or size == 0:
                return lines[-1].decode("utf-8")
    return ""


def file_problem(path: Path, tail_only: bool = False) -> str | None:
    """Why a data file cannot be read as what its name says, or None: a Parquet file whose
    footer does not open, JSON that does not parse, a JSONL line that does not. `tail_only`
    (a JSONL file whose size matches what its stage wrote) parses its last line only: a cut
    shows there, and a million-row `selected.jsonl` is not re-parsed on every resume."""
    name = path.name
    try:
        if name.endswith(".parquet"):
            parquet_rows(path)
        elif name.endswith(".jsonl") and tail_only:
            last = _last_line(path)
            if last.strip():
                json.loads(last)
        elif name.endswith(".jsonl"):
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        json.loads(line)
                    except ValueError as exc:
                        return f"is damaged (line {number}: {_why(exc)})"
        elif name.endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        return f"is damaged ({_why(exc)})"
    return None


def output_inventory(root: Path, outputs: Iterable[Path]) -> dict[str, dict[str, int]]:
    """Each data file under `outputs` -> its size, and its row count for Parquet (footers
    only: cheap), keyed by its path relative to `root`. Recorded in the stage's marker."""
    inventory: dict[str, dict[str, int]] = {}
    for path in output_files(outputs):
        entry = {"bytes": path.stat().st_size}
        if path.name.endswith(".parquet"):
            # An unreadable file gets no row count: verify_outputs names it on the next run.
            with suppress(OSError, ValueError):
                entry["rows"] = parquet_rows(path)
        inventory[_relative(root, path)] = entry
    return inventory


def verify_outputs(
    root: Path, outputs: Iterable[Path], recorded: dict[str, Any] | None = None
) -> list[Damage]:
    """What is wrong with a complete stage's outputs (empty: nothing). Every declared output
    must exist (an empty folder counts as gone), every data file must open (`file_problem`),
    and when the marker `recorded` an inventory (`output_inventory`), every file it lists must
    still be there with the same size and row count."""
    damage: list[Damage] = []
    outputs = list(outputs)
    gone: list[str] = []  # outputs missing as a whole: their files are not named one by one
    for output in outputs:
        if not output.exists():
            gone.append(_relative(root, output))
            damage.append(Damage(gone[-1], "is missing"))
        elif output.is_dir() and not any(output_files([output])):
            gone.append(_relative(root, output))
            damage.append(Damage(gone[-1], "is missing (an empty folder)"))
    present: set[str] = set()
    for path in output_files(outputs):
        name = _relative(root, path)
        present.add(name)
        entry = (recorded or {}).get(name)
        same_size = isinstance(entry, dict) and entry.get("bytes") == path.stat().st_size
        problem = file_problem(path, tail_only=same_size)
        if problem is None and entry is not None:
            problem = _changed(path, entry)
        if problem is not None:
            damage.append(Damage(name, problem))
    for name in sorted(set(recorded or ()) - present):
        if not any(name == g or name.startswith(f"{g}/") for g in gone):
            damage.append(Damage(name, "is missing"))
    return damage


def _changed(path: Path, entry: Any) -> str | None:
    """A size or row count that differs from what the marker recorded."""
    if not isinstance(entry, dict):
        return None
    size = path.stat().st_size
    if isinstance(entry.get("bytes"), int) and size != entry["bytes"]:
        return f"is damaged ({size} bytes, the stage wrote {entry['bytes']})"
    if isinstance(entry.get("rows"), int) and path.name.endswith(".parquet"):
        try:
            rows = parquet_rows(path)
        except (OSError, ValueError) as exc:
            return f"is damaged ({_why(exc)})"
        if rows != entry["rows"]:
            return f"is damaged ({rows} rows, the stage wrote {entry['rows']})"
    return None
