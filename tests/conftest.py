"""Shared fixtures: real data from ../shared, one real local Spark and one real local Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session", autouse=True)
def winnow_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep converted models and `datasets` caches inside the test session."""
    cache = tmp_path_factory.mktemp("winnow-cache")
    os.environ["WINNOW_CACHE"] = str(cache)
    os.environ["HF_HOME"] = str(cache / "hf")
    return cache


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "alpaca_random_9k.json").is_file():
        raise FileNotFoundError(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def alpaca_rows(shared_data: Path) -> list[dict]:
    return json.loads((shared_data / "alpaca_random_9k.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def dolly_rows(shared_data: Path) -> list[dict]:
    return json.loads((shared_data / "dolly_3k.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def spark():
    from engine.config import SparkSpec
    from engine.runtime.spark import spark_session

    session = spark_session(SparkSpec(master="local[2]", shuffle_partitions=4))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from engine.config import RaySpec
    from engine.runtime.ray_cluster import ensure_ray

    ensure_ray(RaySpec(num_cpus=2))
    yield ray
    ray.shutdown()
