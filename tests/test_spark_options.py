"""The options a SparkSession starts with (engine.runtime.spark.spark_options)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from engine.config import SparkSpec
from engine.runtime import spark as spark_module
from engine.runtime.spark import C1_ONLY, JAVA_OPTIONS, spark_options


@pytest.mark.parametrize(
    ("master", "cores", "conf", "expected"),
    [
        ("local[2]", 2, {}, C1_ONLY),
        ("local[*]", 4, {}, C1_ONLY),
        ("local[2]", 16, {}, None),  # many cores: the JVM's default JIT
        ("spark://host:7077", 2, {}, None),  # a cluster's executors are not this JVM
        ("local[2]", 2, {JAVA_OPTIONS: "-Xss4m"}, "-Xss4m"),  # the job's own options win
    ],
)
def test_a_small_local_machine_runs_the_jvm_with_c1_only(
    monkeypatch: pytest.MonkeyPatch, master: str, cores: int, conf: dict, expected: str | None
) -> None:
    monkeypatch.setattr(spark_module.os, "cpu_count", lambda: cores)
    options = spark_options(SparkSpec(master=master, conf=conf))
    assert options.get(JAVA_OPTIONS) == expected


def test_the_session_jvm_runs_with_the_option(spark: Any) -> None:
    # The shared test session is local[2] on this (2-core) machine: the option reached the JVM.
    jvm = spark.sparkContext._jvm
    arguments = list(
        jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments()
    )
    if (os.cpu_count() or 1) <= spark_module.C1_MAX_CORES:
        assert C1_ONLY in arguments
    else:
        assert C1_ONLY not in arguments
