"""A worker that died for good is named in one line (engine.runtime.worker_lost); the slow test
that kills Spark Python workers for real is tests/test_fault_spark_worker.py."""

from __future__ import annotations

import pytest
import ray.exceptions

from engine.runtime.worker_lost import worker_lost, worker_lost_message

# What Py4J hands the driver when a task used up its attempts (abridged from a real spark.log).
SPARK_TEXT = (
    "An error occurred while calling o123.parquet.\n"
    ": org.apache.spark.SparkException: Job aborted due to stage failure: Task 1 in stage 3.0 "
    "failed 4 times, most recent failure: Lost task 1.3 in stage 3.0 (TID 9) (127.0.0.1 "
    "executor driver): org.apache.spark.SparkException: Python worker exited unexpectedly "
    "(crashed)\n\tat org.apache.spark.api.python.BasePythonRunner..."
)


class Py4JLikeError(Exception):
    """Stands in for py4j's Py4JJavaError, whose constructor needs a live JVM object."""


def test_spark_worker_death_after_all_attempts() -> None:
    assert worker_lost(Py4JLikeError(SPARK_TEXT)) == (
        "a Spark Python worker crashed, on all 4 attempts of a task"
    )
    wrapped = RuntimeError("ingest failed")
    wrapped.__cause__ = Py4JLikeError(SPARK_TEXT)
    message = worker_lost_message(wrapped, "ingest")
    assert message.startswith("winnow: ingest: a Spark Python worker crashed, on all 4 attempts")
    assert "run the same command again to resume" in message


def test_lost_executor() -> None:
    text = "Task 0 in stage 1.0 failed 1 times ... ExecutorLostFailure (executor 2 exited)"
    assert worker_lost(Py4JLikeError(text)).startswith("a Spark executor was lost")


@pytest.mark.parametrize(
    ("error", "what"),
    [
        (ray.exceptions.ActorDiedError(), "a Ray actor died"),
        (ray.exceptions.WorkerCrashedError(), "a Ray worker process died"),
        (ray.exceptions.RayActorError(), "a Ray actor died"),
    ],
)
def test_ray_deaths_by_class(error: BaseException, what: str) -> None:
    assert worker_lost(error) == what
    context = ValueError("while collecting results")
    context.__context__ = error
    assert worker_lost(context) == what


def test_other_errors_are_not_worker_deaths() -> None:
    assert worker_lost(ValueError("Python worker said hello")) is None
    assert worker_lost_message(KeyError("x"), "lm") is None
    loop = RuntimeError("a")
    loop.__context__ = loop  # a cycle in the chain must not hang
    assert worker_lost(loop) is None
