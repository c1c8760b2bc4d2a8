"""The SparkSession factory: a real local Spark by default, any master by config.

Quiet (a `logs` folder and not verbose): log4j2 writes to `logs/spark.log` (a properties file
written into `logs/` and named by `-Dlog4j2.configurationFile` in the driver's Java options),
and whatever the JVM itself prints (the launcher's "WARNING: Using incubator modules", JVM
warnings, Python workers' stderr, which the JVM forwards) goes to `logs/spark-jvm.log`: the JVM is
launched through `pyspark.java_gateway.launch_gateway(conf, popen_kwargs=...)`, PySpark's
documented hook for capturing its stdout/stderr, and handed to `SparkContext(gateway=...)`.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from engine.config import SparkSpec

JAVA_OPTIONS = "spark.driver.extraJavaOptions"
LOG4J_OPTION = "log4j2.configurationFile"

LOG4J2_PROPERTIES = """\
# Written by winnow: Spark's log4j2 output for this run goes to spark.log beside this file.
status = error
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
appender.file.type = File
appender.file.name = file
appender.file.fileName = {path}
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d{{yy/MM/dd HH:mm:ss}} %p %c{{1}}: %m%n%ex
logger.jetty.name = org.sparkproject.jetty
logger.jetty.level = warn
logger.parquet1.name = org.apache.parquet
logger.parquet1.level = error
logger.parquet2.name = parquet
logger.parquet2.level = error
logger.hadoop.name = org.apache.hadoop
logger.hadoop.level = warn
"""


def write_log4j2_config(logs: Path) -> Path:
    """A log4j2 properties file in `logs/` that sends every Spark log line to logs/spark.log.
    Absolute: the JVM's options name it by URI, and a run's `out:` may be relative."""
    logs = logs.absolute()
    logs.mkdir(parents=True, exist_ok=True)
    config = logs / "log4j2.properties"
    config.write_text(LOG4J2_PROPERTIES.format(path=logs / "spark.log"), encoding="utf-8")
    return config


LOCAL_MASTER = re.compile(r"local(?:\[(\*|\d+)\])?")
TASK_MAX_FAILURES = "spark.task.maxFailures"
DEFAULT_TASK_ATTEMPTS = 4  # Spark's own default on a cluster


def local_master_with_retries(master: str, conf: Mapping[str, str] | None = None) -> str:
    """`local` / `local[N]` / `local[*]` as `local[N,F]`: local mode ignores
    `spark.task.maxFailures` and fails the job on a task's first failure (a Python worker
    killed by the OOM killer, say), where a cluster retries it. Retrying is safe: tasks are
    deterministic and Spark's writes go through output committers. F is the job's
    `spark.task.maxFailures` (default 4, as on a cluster); a master that names its own F
    (`local[N,F]`), or any other master, is left as given."""
    match = LOCAL_MASTER.fullmatch(master.strip())
    if match is None:
        return master
    attempts = int((conf or {}).get(TASK_MAX_FAILURES, DEFAULT_TASK_ATTEMPTS))
    return f"local[{match.group(1) or 1},{attempts}]"


def spark_options(
    spec: SparkSpec, app_name: str = "winnow", log4j_config: Path | None = None
) -> dict[str, str]:
    """Every setting the session starts with: ours, then the job's `spark.conf` (which wins),
    then the log4j2 file added to the driver's Java options unless the job names its own."""
    options = {
        "spark.app.name": app_name,
        "spark.master": local_master_with_retries(spec.master, spec.conf),
        "spark.driver.memory": spec.driver_memory,
        "spark.sql.shuffle.partitions": str(spec.shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.session.timeZone": "UTC",
    }
    options.update({key: str(value) for key, value in spec.conf.items()})
    if log4j_config is not None:
        java = options.get(JAVA_OPTIONS, "")
        if LOG4J_OPTION not in java:
            # A URI: no spaces for the launcher to split the option on.
            option = f"-D{LOG4J_OPTION}={log4j_config.absolute().as_uri()}"
            options[JAVA_OPTIONS] = f"{java} {option}".strip()
    return options


def spark_session(
    spec: SparkSpec,
    app_name: str = "winnow",
    logs: Path | None = None,
    verbose: bool = False,
) -> SparkSession:
    """Start (or reuse) a SparkSession whose Python workers run this interpreter.

    With `logs` and not `verbose`, Spark's logs go to files under `logs` (module docstring) and
    nothing of the JVM's reaches the terminal; otherwise they go to the terminal, errors only.
    A JVM already running in this process (Spark keeps it after `stop()`) cannot be relaunched:
    its log4j2 is pointed at this run's `logs/spark.log`, its stdout/stderr stay where they were
    (and a verbose session after a quiet one keeps that JVM's log4j2 on the earlier file).
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if spec.master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    quiet = logs is not None and not verbose
    if logs is not None:
        from engine.runtime.console import configure_logging

        configure_logging(logs, verbose)
    log4j_config = write_log4j2_config(Path(logs)) if quiet else None
    options = spark_options(spec, app_name, log4j_config)
    if log4j_config is not None and log4j_config.as_uri() not in options.get(JAVA_OPTIONS, ""):
        log4j_config = None  # the job names its own log4j2 configuration: it is left alone
    launched = quiet and _launch_quiet_jvm(options, Path(logs) / "spark-jvm.log")
    session = SparkSession.builder.config(map=options).getOrCreate()
    if not quiet:
        session.sparkContext.setLogLevel("ERROR")
    elif not launched and log4j_config is not None:
        _point_log4j_at(session, log4j_config)
    return session


def _launch_quiet_jvm(options: dict[str, str], output: Path) -> bool:
    """Start the JVM with its stdout/stderr in `output` and make it the SparkContext's; False
    when a JVM is already running (the builder reuses it) or Spark Connect is configured."""
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway

    if getattr(SparkContext, "_gateway", None) is not None or _connect_mode(options):
        return False
    conf = SparkConf()
    conf.setAll(list(options.items()))
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "ab") as sink:  # the JVM keeps its own copy of the descriptor
        gateway = launch_gateway(conf, popen_kwargs={"stdout": sink, "stderr": sink})
    try:
        SparkContext(conf=conf, gateway=gateway)
    except BaseException:
        if gateway.proc is not None:
            gateway.proc.kill()
        raise
    return True


def _connect_mode(options: dict[str, str]) -> bool:
    """Spark Connect: no local JVM gateway to launch (the builder's connect path decides)."""
    from pyspark.util import default_api_mode

    mode = options.get("spark.api.mode", os.environ.get("SPARK_API_MODE", "")).lower()
    if mode not in ("classic", "connect"):
        mode = default_api_mode()
    return (
        mode == "connect"
        or "spark.remote" in options
        or "SPARK_REMOTE" in os.environ
        or "SPARK_CONNECT_MODE_ENABLED" in os.environ
    )


def _point_log4j_at(session: SparkSession, config: Path) -> None:
    """Reconfigure a running JVM's log4j2 from `config` (a JVM started earlier in this process,
    by another run or a test) through log4j2's own Configurator API."""
    try:
        jvm = session.sparkContext._jvm
        uri = jvm.java.net.URI.create(config.absolute().as_uri())
        jvm.org.apache.logging.log4j.core.config.Configurator.reconfigure(uri)
    except Exception:  # not log4j2 core (a custom cluster setup): leave its logging alone
        pass


def map_arrow(frame: Any, fn: Callable[[pa.RecordBatch], pa.RecordBatch], schema: pa.Schema) -> Any:
    """`frame.mapInArrow` with a per-batch function and an Arrow output schema: the one wrapper
    every Spark stage uses (the function must be picklable: a module-level function or a
    closure over plain values)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out = fn(batch)
            if isinstance(out, pa.Table):
                yield from out.to_batches()
            else:
                yield out

    return frame.mapInArrow(run, from_arrow_schema(schema))
