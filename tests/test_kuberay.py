"""`winnow k8s`: KubeRay manifests sized from the stages' resources, validated offline against
the KubeRay CRDs in ../shared/schemas/kuberay (strict unknown fields + the operator's rules)."""

from __future__ import annotations

import copy
import importlib.metadata
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from engine.cli import app
from engine.cluster.crd_validate import (
    DEFAULT_SCHEMAS,
    ManifestError,
    check_manifests,
    cron_errors,
    load_schemas,
    validate_manifest,
    validate_value,
)
from engine.cluster.kuberay import (
    GPU_RESOURCE,
    K8sOptions,
    Pool,
    build_manifests,
    stage_pools,
    worker_groups,
)
from engine.config import load_job, parse_job

REPO = Path(__file__).resolve().parents[1]
OPTIONS = K8sOptions(job_path="/data/jobs/job.yaml", schedule="0 2 * * *")
runner = CliRunner()


@pytest.fixture(scope="module")
def schemas() -> dict:
    if not DEFAULT_SCHEMAS.is_dir():
        raise FileNotFoundError(f"KubeRay CRDs not found at {DEFAULT_SCHEMAS}")
    return load_schemas(DEFAULT_SCHEMAS)


@pytest.fixture(scope="module")
def cluster_job():
    return load_job(REPO / "cluster" / "cluster-job.yaml")


def gpu_job_spec() -> dict[str, Any]:
    """The GPU evaluation job (jobs/eval-gpu.yaml) with its evaluation loop and an LM signal."""
    data = yaml.safe_load((REPO / "jobs" / "eval-gpu.yaml").read_text(encoding="utf-8"))
    data["inputs"] = [{"path": "/data/corpora/alpaca.json"}]
    data["out"] = "/data/runs/eval"
    data["signals"] = ["lm"]
    data["eval"] = {}
    data["stages"]["lm"]["resources"] = {"num_cpus": 2, "num_gpus": 1, "concurrency": 3}
    return data


def _cluster(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec.get("jobTemplate", spec)["rayClusterSpec"]


def _groups(manifest: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in _cluster(manifest).get("workerGroupSpecs", [])}


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def test_cluster_job_manifests_validate(cluster_job, schemas) -> None:
    manifests = build_manifests(cluster_job, OPTIONS)
    assert [m["kind"] for m in manifests] == ["RayJob", "RayCronJob"]
    check_manifests(manifests, schemas)  # raises naming every problem
    job = manifests[0]["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    assert job["entrypoint"] == "python -m engine run /data/jobs/job.yaml"
    # The tokens pool (2 CPUs x 16 actors) fits the CPU group with one CPU per pod to spare.
    res = cluster_job.stages.tokens.resources
    cpu = _groups(manifests[0])["cpu"]
    pod_cpus = int(_container(cpu)["resources"]["requests"]["cpu"])
    per_pod = int((pod_cpus - 1) // res.num_cpus)
    assert cpu["replicas"] * per_pod >= res.concurrency > (cpu["replicas"] - 1) * per_pod
    assert cpu["minReplicas"] == cpu["replicas"] == cpu["maxReplicas"]
    assert "gpu" not in _groups(manifests[0])
    # Every pod mounts the shared volume, and the score cache lives on it.
    for manifest in manifests:
        cluster = _cluster(manifest)
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            container = _container(group)
            assert {"name": "winnow-data", "mountPath": "/data"} in container["volumeMounts"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["WINNOW_CACHE"].startswith("/data/")


def test_ray_version_is_the_pinned_one(cluster_job) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    pins = [d for d in pyproject["project"]["dependencies"] if re.match(r"ray(\[|=)", d)]
    pinned = pins[0].split("==")[1]
    assert pinned == importlib.metadata.version("ray")
    for manifest in build_manifests(cluster_job, OPTIONS):
        assert _cluster(manifest)["rayVersion"] == pinned
        assert pinned in _container(_cluster(manifest)["headGroupSpec"])["image"]


def test_gpu_job_gets_gpu_limits_from_num_gpus(schemas) -> None:
    job = parse_job(gpu_job_spec())
    manifests = build_manifests(job, OPTIONS)
    check_manifests(manifests, schemas)
    gpu = _groups(manifests[0])["gpu"]
    limits = _container(gpu)["resources"]["limits"]
    per_pod = limits[GPU_RESOURCE]
    assert per_pod >= 1 and gpu["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    # Every GPU pool (LM 3 x 1 GPU, the fine-tune's worker, the judge, embed at 0.25) fits.
    for pool in stage_pools(job):
        if pool.gpus:
            assert gpu["replicas"] * (per_pod // pool.gpus) >= pool.actors, pool
    assert gpu["replicas"] == math.ceil(3 / per_pod)  # the LM pool is the largest
    # The fine-tune's workers are there because the job has an `eval:` block.
    assert "train" in [p.stage for p in stage_pools(job)]
    without_eval = parse_job({k: v for k, v in gpu_job_spec().items() if k != "eval"})
    assert "train" not in [p.stage for p in stage_pools(without_eval)]
    # A job without GPU stages asks for no GPU anywhere.
    cpu_only = yaml.safe_dump(
        build_manifests(load_job(REPO / "cluster" / "cluster-job.yaml"), OPTIONS)
    )
    assert GPU_RESOURCE not in cpu_only


def test_secrets_come_from_a_secret_never_inline(schemas, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-in-a-manifest")
    manifests = build_manifests(parse_job(gpu_job_spec()), OPTIONS)
    check_manifests(manifests, schemas)
    text = yaml.safe_dump(manifests)
    assert "sk-never-in-a-manifest" not in text
    for manifest in manifests:
        cluster = _cluster(manifest)
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            env = {e["name"]: e for e in _container(group)["env"]}
            key = env["OPENAI_API_KEY"]
            assert "value" not in key
            ref = key["valueFrom"]["secretKeyRef"]
            assert ref == {"name": OPTIONS.secret, "key": "OPENAI_API_KEY", "optional": True}


def _set(manifest: dict, path: str, value: Any) -> dict:
    """A copy with `path` (dots, [i]) set to value; value None deletes the key."""
    broken = copy.deepcopy(manifest)
    parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path)]
    target = broken
    for part in parts[:-1]:
        target = target[part]
    if value is None:
        del target[parts[-1]]
    else:
        target[parts[-1]] = value
    return broken


WORKER = "spec.rayClusterSpec.workerGroupSpecs[0]"
HEAD_CONTAINER = "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0]"
BROKEN = [
    # (field set, value (None deletes), the path the error must name, what it must say)
    (f"{WORKER}.replica", 2, f"{WORKER}.replica", "unknown field"),
    ("spec.entryPoint", "python x.py", "spec.entryPoint", "unknown field"),
    (f"{HEAD_CONTAINER}.resource", {}, f"{HEAD_CONTAINER}.resource", "unknown field"),
    ("spec.ttlSecondsAfterFinished", "an hour", "spec.ttlSecondsAfterFinished", "must be integer"),
    ("spec.shutdownAfterJobFinishes", "yes", "spec.shutdownAfterJobFinishes", "must be boolean"),
    (f"{WORKER}.rayStartParams", {"num-cpus": 4}, f"{WORKER}.rayStartParams[num-cpus]", "string"),
    (f"{WORKER}.groupName", None, f"{WORKER}.groupName", "Required value"),
    (f"{HEAD_CONTAINER}.name", None, f"{HEAD_CONTAINER}.name", "Required value"),
    (
        "spec.rayClusterSpec.autoscalerOptions",
        {"upscalingMode": "Fast"},
        "spec.rayClusterSpec.autoscalerOptions.upscalingMode",
        "unsupported value 'Fast'",
    ),
    (
        f"{HEAD_CONTAINER}.resources.limits.cpu",
        "four",
        f"{HEAD_CONTAINER}.resources.limits.cpu",
        "does not match",
    ),
    (f"{WORKER}.replicas", 2**31, f"{WORKER}.replicas", "out of range for int32"),
    ("spec.rayClusterSpec.headGroupSpec", None, "spec.rayClusterSpec.headGroupSpec", "Required"),
    # The operator's rules.
    ("spec.rayClusterSpec.rayVersion", None, "spec.rayClusterSpec.rayVersion", "Required"),
    ("metadata.name", "Winnow_Job", "metadata.name", "DNS-1035"),
    ("metadata.name", "w" * 48, "metadata.name", "no more than 47"),
    (f"{WORKER}.minReplicas", 99, f"{WORKER}.minReplicas", "above maxReplicas"),
    (f"{WORKER}.replicas", 99, f"{WORKER}.replicas", "outside"),
    (
        "spec.shutdownAfterJobFinishes",
        False,
        "spec.ttlSecondsAfterFinished",
        "shutdownAfterJobFinishes",
    ),
    ("spec.runtimeEnvYAML", "pip: [unclosed", "spec.runtimeEnvYAML", "not valid YAML"),
    ("spec.submissionMode", "BatchMode", "spec.submissionMode", "unsupported value"),
    ("status", {"jobStatus": "RUNNING"}, "status", "set by the operator"),
]


@pytest.mark.parametrize(("path", "value", "named", "says"), BROKEN)
def test_broken_manifest_is_rejected_naming_the_field(
    cluster_job, schemas, path: str, value: Any, named: str, says: str
) -> None:
    manifest = build_manifests(cluster_job, OPTIONS)[0]
    assert validate_manifest(manifest, schemas) == []
    errors = validate_manifest(_set(manifest, path, value), schemas)
    assert any(e.startswith(f"{named}:") and says in e for e in errors), errors


def test_duplicates_are_rejected(cluster_job, schemas) -> None:
    manifest = build_manifests(cluster_job, OPTIONS)[0]
    groups = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    twice = _set(manifest, "spec.rayClusterSpec.workerGroupSpecs", [groups[0], groups[0]])
    errors = validate_manifest(twice, schemas)
    assert any(
        e.startswith("spec.rayClusterSpec.workerGroupSpecs[1].groupName:") and "twice" in e
        for e in errors
    ), errors
    containers = manifest["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    two = _set(manifest, f"{HEAD_CONTAINER[:-3]}", [containers["containers"][0]] * 2)
    errors = validate_manifest(two, schemas)
    assert any(e.startswith(f"{HEAD_CONTAINER[:-3]}[1]:") and "Duplicate" in e for e in errors), (
        errors
    )


def test_cron_job_rules(cluster_job, schemas) -> None:
    cron = build_manifests(cluster_job, OPTIONS)[1]
    assert cron["spec"]["schedule"] == "0 2 * * *"
    assert (
        cron["spec"]["jobTemplate"]["entrypoint"] == "python -m engine refresh /data/jobs/job.yaml"
    )
    errors = validate_manifest(_set(cron, "spec.schedule", "61 2 * * *"), schemas)
    assert any(e.startswith("spec.schedule:") and "minute" in e for e in errors), errors
    errors = validate_manifest(_set(cron, "spec.jobTemplate.ttlSecondsAfterFinished", -1), schemas)
    assert any(e.startswith("spec.jobTemplate.ttlSecondsAfterFinished:") for e in errors), errors
    errors = validate_manifest(_set(cron, "spec.jobTemplate", None), schemas)
    assert any(e.startswith("spec.jobTemplate: Required value") for e in errors), errors
    with pytest.raises(ManifestError, match=r"RayCronJob winnow-nightly: spec\.schedule"):
        check_manifests([_set(cron, "spec.schedule", "every night")], schemas)


@pytest.mark.parametrize(
    ("schedule", "valid"),
    [
        ("0 2 * * *", True),
        ("*/15 0-6 1,15 JAN-MAR mon-fri", True),
        ("0 3 ? * SUN", True),
        ("@daily", True),
        ("@every 1h30m", True),
        ("0 2 * *", False),
        ("60 2 * * *", False),
        ("0 24 * * *", False),
        ("0 2 0 * *", False),
        ("0 2 * 13 *", False),
        ("0 2 * * 7", False),
        ("0 2 * * */0", False),
        ("5-1 2 * * *", False),
        ("CRON_TZ=UTC 0 2 * * *", False),
        ("@nightly", False),
    ],
)
def test_cron_schedule(schedule: str, valid: bool) -> None:
    assert (cron_errors(schedule) == []) is valid, cron_errors(schedule)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0, 8.0]),
            st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0, 2.0]),
            st.integers(1, 40),
        ),
        min_size=1,
        max_size=5,
    ),
    st.integers(2, 16),
    st.integers(1, 8),
)
def test_worker_groups_hold_the_largest_pool(pools, cpus_per_worker, gpus_per_worker) -> None:
    """Whatever the pools, each fits its group: GPUs per pod cover whole actors, CPU pods keep
    one CPU spare, and no group is bigger than its largest pool needs."""
    pools = [Pool(f"s{i}", c, g, n) for i, (c, g, n) in enumerate(pools)]
    options = K8sOptions(
        job_path="/data/j.yaml", cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker
    )
    groups = {g.name: g for g in worker_groups(pools, options)}
    assert set(groups) == {"cpu" if p.gpus == 0 else "gpu" for p in pools}
    for pool in pools:
        group = groups["gpu" if pool.gpus else "cpu"]
        if pool.gpus:
            per_pod = int(group.gpus // pool.gpus)
            assert per_pod >= 1
            assert group.cpus >= math.ceil(min(per_pod, pool.actors) * pool.cpus) + 1
        else:
            per_pod = int((group.cpus - 1) // pool.cpus)
            assert per_pod >= 1
        assert group.replicas * per_pod >= pool.actors
    for group in groups.values():  # one replica fewer would not hold some pool
        members = [p for p in pools if (p.gpus > 0) == (group.name == "gpu")]
        fits = []
        for pool in members:
            per_pod = (
                int(group.gpus // pool.gpus) if pool.gpus else int((group.cpus - 1) // pool.cpus)
            )
            fits.append((group.replicas - 1) * per_pod >= pool.actors)
        assert not all(fits)


def test_cli_prints_validated_documents(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "k8s",
            str(REPO / "cluster" / "cluster-job.yaml"),
            "--schedule",
            "0 2 * * *",
            "--namespace",
            "data",
            "--pvc",
            "corpora",
            "--mount",
            "/data",
            "--schemas",
            str(DEFAULT_SCHEMAS),
        ],
    )
    assert result.exit_code == 0, result.output
    documents = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in documents] == ["RayJob", "RayCronJob"]
    assert "\n---\n" in result.stdout and "&id" not in result.stdout
    for document in documents:
        assert document["metadata"]["namespace"] == "data"
        volumes = _cluster(document)["headGroupSpec"]["template"]["spec"]["volumes"]
        assert {"name": "winnow-data", "persistentVolumeClaim": {"claimName": "corpora"}} in volumes
    out = tmp_path / "job.k8s.yaml"
    result = runner.invoke(app, ["k8s", str(REPO / "jobs" / "demo.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [d["kind"] for d in yaml.safe_load_all(out.read_text())] == ["RayJob"]
    assert "not on the shared volume" in result.stderr  # runs/demo is a local path
    bad = runner.invoke(app, ["k8s", str(REPO / "jobs" / "demo.yaml"), "--schemas", str(out)])
    assert bad.exit_code != 0


def test_structural_schema_extensions() -> None:
    """The Kubernetes extensions the CRDs use, on a schema small enough to read."""
    schema = {
        "type": "object",
        "required": ["size"],
        "properties": {
            "size": {"x-kubernetes-int-or-string": True, "pattern": "^[0-9]+Gi$"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "tags": {"type": "object", "additionalProperties": {"type": "string"}},
            "note": {"type": "string", "nullable": True},
            "ports": {
                "type": "array",
                "x-kubernetes-list-type": "set",
                "items": {"type": "integer", "format": "int32", "minimum": 1},
            },
        },
    }
    good = {"size": 4, "free": {"any": {"thing": 1}}, "tags": {"a": "b"}, "note": None}
    assert validate_value(good, schema) == []
    assert validate_value({**good, "size": "4Gi", "ports": [80, 443]}, schema) == []
    cases = {
        "size": ({**good, "size": "4G"}, "does not match"),
        "size ": ({**good, "size": 4.5}, "integer or a string"),
        "tags.a": ({**good, "tags": {"a": 1}}, "must be string"),
        "ports[1]": ({**good, "ports": [80, 80]}, "Duplicate"),
        "ports[0]": ({**good, "ports": [0]}, "must be >= 1"),
        "other": ({**good, "other": 1}, "unknown field"),
    }
    for path, (value, says) in cases.items():
        errors = validate_value(value, schema)
        assert any(e.startswith(f"{path.strip()}:") and says in e for e in errors), (path, errors)
    assert validate_value({"free": {}}, schema) == ["size: Required value"]
    assert validate_value({**good, "tags": None}, schema)[0].startswith("tags: null")
