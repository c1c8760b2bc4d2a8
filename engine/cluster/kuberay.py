"""KubeRay manifests for a job: a RayJob (and, for a nightly schedule, a RayCronJob).

`build_manifests(job, options)` is a pure function of the validated job spec: the cluster it
describes is sized from what the job's enabled stages declare (engine.stages.contract), so a job
that asks for 4 actors of 1 GPU gets a GPU worker group with 4 GPUs, and one without model
stages gets no workers at all. Ray actor stages run one after another, so the workers are sized
for the largest pool, not the sum:

- CPU pools (actors without GPUs): one `cpu` worker group; each pod has `cpus_per_worker` CPUs
  (at least one actor's), one CPU of which stays free for Ray Data's read and write tasks (an
  actor pool holding every CPU never gets its input; shared/notes/runtime-facts.md).
- GPU pools: one `gpu` worker group; each pod has `gpus_per_worker` GPUs (at least one actor's)
  as the `nvidia.com/gpu` limit, and the CPUs its actors declare plus one.
- The fine-tune of an `eval:` block (stage `train`): `num_workers` workers of `cpus_per_worker`
  CPUs (and `gpus_per_worker` GPUs with `use_gpu`), placed the same way.
- The head runs the job's driver and, with `spark.master: local[...]`, Spark itself: it gets
  the cores of `local[N]` (`head_cpus` for `local[*]` or a remote master) and Spark's driver
  memory plus headroom; Ray schedules no actors there (`num-cpus: "0"`).

Every pod mounts one PersistentVolumeClaim (`mount`, default /data) for inputs, outputs and the
score cache (WINNOW_CACHE points into it, so a nightly refresh re-scores only new rows), and an
in-memory /dev/shm for Ray's object store. API keys come from a Secret (`secretKeyRef`), never
inline. The image must have Winnow installed (`pip install winnow` on top of the Ray image).
"""

from __future__ import annotations

import copy
import importlib.metadata
import math
import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from engine.config import JobSpec

API_VERSION = "ray.io/v1"
VOLUME = "winnow-data"
MANAGED_BY = {"app.kubernetes.io/name": "winnow", "app.kubernetes.io/managed-by": "winnow"}
GPU_RESOURCE = "nvidia.com/gpu"


def ray_version() -> str:
    """The Ray this project pins (and runs): the cluster's Ray must be the same."""
    return importlib.metadata.version("ray")


def default_image(gpu: bool = False) -> str:
    """Ray's own image for the pinned Ray and this project's Python (Winnow not included)."""
    return f"rayproject/ray:{ray_version()}-py311{'-gpu' if gpu else ''}"


@dataclass(frozen=True)
class K8sOptions:
    """How the job is deployed (never what it computes)."""

    job_path: str  # the job spec's path on the shared volume (the entry point's argument)
    name: str = "winnow"
    namespace: str | None = None
    image: str | None = None  # default: default_image(); must have Winnow installed
    gpu_image: str | None = None  # default: image, or default_image(gpu=True)
    pvc: str = "winnow-data"
    mount: str = "/data"
    schedule: str | None = None  # cron: adds a RayCronJob that runs `refresh` on it
    time_zone: str | None = None
    ttl_seconds: int = 3600  # keep the finished cluster this long for its logs
    secret: str = "winnow-api-keys"  # the Secret holding API keys, one key per env var name
    head_cpus: int = 4
    cpus_per_worker: int = 8
    gpus_per_worker: int = 1
    memory_per_cpu_gi: int = 4


@dataclass(frozen=True)
class Pool:
    """One stage's Ray actors (or Ray Train workers): what each holds and how many."""

    stage: str
    cpus: float
    gpus: float
    actors: int


def stage_pools(job: JobSpec) -> list[Pool]:
    """The Ray actor pools of the job's enabled stages, from their declared resources."""
    from engine.stages.registry import enabled_stages

    pools = []
    for stage in enabled_stages(job):
        res = stage.resources(job)
        if stage.engine != "ray" or res is None:
            continue
        if hasattr(res, "num_workers"):  # Ray Train (stages.train)
            gpus = res.gpus_per_worker if res.use_gpu else 0.0
            pools.append(Pool(stage.name, res.cpus_per_worker, gpus, res.num_workers))
        elif hasattr(res, "num_cpus") and hasattr(res, "concurrency"):
            gpus = getattr(res, "num_gpus", 0.0)
            pools.append(Pool(stage.name, res.num_cpus, gpus, res.concurrency))
    return pools


def api_key_envs(job: JobSpec) -> list[str]:
    """Environment variables holding API keys that enabled stages read (OpenAI-compatible
    endpoints), for `secretKeyRef`s; never their values."""
    from engine.stages.registry import enabled_stages

    names: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "api_key_env" and isinstance(item, str) and item:
                    names.append(item)
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for stage in enabled_stages(job):
        spec = getattr(job.stages, stage.name, None)
        backend = str(getattr(spec, "backend", "openai"))
        res = stage.resources(job)
        if res is not None and "openai" in backend:
            walk(res.model_dump(mode="json"))
    return sorted(set(names))


def _spark_memory_gi(text: str) -> float:
    """Spark's memory strings ('4g', '512m', '16G', '1t') in GiB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)b?", text.strip().lower())
    if not match:
        return 4.0
    value, unit = float(match.group(1)), match.group(2)
    return value * {"k": 2**-20, "m": 2**-10, "": 2**-30, "g": 1, "t": 2**10, "p": 2**20}[unit]


def head_cpus(job: JobSpec, options: K8sOptions) -> int:
    """`local[N]` Spark runs N cores in the driver on the head; otherwise options.head_cpus."""
    match = re.fullmatch(r"local\[(\d+)(?:,\s*\d+)?\]", job.spark.master.strip())
    if match:
        return max(1, int(match.group(1)))
    if job.spark.master.strip() == "local":
        return 1
    return options.head_cpus


@dataclass(frozen=True)
class Group:
    name: str
    replicas: int
    cpus: int
    gpus: int
    stages: tuple[str, ...]


def worker_groups(pools: list[Pool], options: K8sOptions) -> list[Group]:
    """The worker groups that hold the largest CPU pool and the largest GPU pool (module doc)."""
    groups = []
    cpu_pools = [p for p in pools if p.gpus == 0]
    if cpu_pools:
        # Pods of cpus_per_worker CPUs, smaller when the largest pool needs less; always room
        # for one actor plus the spare CPU.
        largest = max(math.ceil(p.actors * p.cpus) + 1 for p in cpu_pools)
        one_actor = max(math.ceil(p.cpus) + 1 for p in cpu_pools)
        cpus = max(min(options.cpus_per_worker, largest), one_actor)
        # Actors per pod leave one CPU for Ray Data's tasks; replicas hold the largest pool.
        replicas = max(math.ceil(p.actors / max(1, int((cpus - 1) // p.cpus))) for p in cpu_pools)
        stages = tuple(p.stage for p in cpu_pools)
        groups.append(Group("cpu", replicas, cpus, 0, stages))
    gpu_pools = [p for p in pools if p.gpus > 0]
    if gpu_pools:
        gpus = max(options.gpus_per_worker, *(math.ceil(p.gpus) for p in gpu_pools))
        per_pod = {p.stage: max(1, int(gpus // p.gpus)) for p in gpu_pools}
        replicas = max(math.ceil(p.actors / per_pod[p.stage]) for p in gpu_pools)
        cpus = max(math.ceil(min(per_pod[p.stage], p.actors) * p.cpus) for p in gpu_pools) + 1
        stages = tuple(p.stage for p in gpu_pools)
        groups.append(Group("gpu", replicas, cpus, gpus, stages))
    return groups


def _env(options: K8sOptions, keys: list[str]) -> list[dict[str, Any]]:
    cache = str(PurePosixPath(options.mount) / "winnow-cache")
    env: list[dict[str, Any]] = [
        {"name": "WINNOW_CACHE", "value": cache},  # score cache + converted models, shared
        {"name": "HF_HOME", "value": f"{cache}/hf"},  # one model download for every pod
        {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
    ]
    for key in keys:
        ref = {"name": options.secret, "key": key, "optional": True}
        env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def _pod(
    container: str, image: str, cpus: int, memory_gi: int, gpus: int, options: K8sOptions, env: list
) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": str(cpus), "memory": f"{memory_gi}Gi"}
    limits: dict[str, Any] = {"cpu": str(cpus), "memory": f"{memory_gi}Gi"}
    if gpus:
        limits[GPU_RESOURCE] = gpus  # extended resources: the limit is the request
    return {
        "metadata": {"labels": dict(MANAGED_BY)},
        "spec": {
            "containers": [
                {
                    "name": container,
                    "image": image,
                    "resources": {"requests": requests, "limits": limits},
                    "env": copy.deepcopy(env),
                    "volumeMounts": [
                        {"name": VOLUME, "mountPath": options.mount},
                        {"name": "dshm", "mountPath": "/dev/shm"},
                    ],
                }
            ],
            "volumes": [
                {"name": VOLUME, "persistentVolumeClaim": {"claimName": options.pvc}},
                {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            ],
        },
    }


def ray_job_spec(job: JobSpec, options: K8sOptions, command: str = "run") -> dict[str, Any]:
    """The RayJob `spec` (also the RayCronJob's `jobTemplate`) running `winnow <command>`."""
    image = options.image or default_image()
    gpu_image = options.gpu_image or (options.image or default_image(gpu=True))
    env = _env(options, api_key_envs(job))
    cpus = head_cpus(job, options)
    head_memory = math.ceil(_spark_memory_gi(job.spark.driver_memory) + 4)
    workers = []
    for group in worker_groups(stage_pools(job), options):
        memory = max(8, options.memory_per_cpu_gi * group.cpus)
        pod = _pod(
            "ray-worker",
            gpu_image if group.gpus else image,
            group.cpus,
            memory,
            group.gpus,
            options,
            env,
        )
        workers.append(
            {
                "groupName": group.name,
                "replicas": group.replicas,
                "minReplicas": group.replicas,
                "maxReplicas": group.replicas,
                "rayStartParams": {},
                "template": pod,
            }
        )
    cluster: dict[str, Any] = {
        "rayVersion": ray_version(),
        "headGroupSpec": {
            # The head runs the driver (and local Spark); actors go to the workers. A job
            # without Ray stages has no workers, and nothing needs the head's Ray CPUs.
            "rayStartParams": {"num-cpus": "0"} if workers else {},
            "template": _pod("ray-head", image, cpus, head_memory, 0, options, env),
        },
    }
    if workers:
        cluster["workerGroupSpecs"] = workers
    return {
        "entrypoint": f"python -m engine {command} {options.job_path}",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": options.ttl_seconds,
        "submissionMode": "K8sJobMode",
        "rayClusterSpec": cluster,
    }


def _metadata(name: str, options: K8sOptions) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": dict(MANAGED_BY)}
    if options.namespace:
        metadata["namespace"] = options.namespace
    return metadata


def build_manifests(job: JobSpec, options: K8sOptions) -> list[dict[str, Any]]:
    """The RayJob for one run now, and with `options.schedule` a RayCronJob that runs
    `winnow refresh` on that schedule (the nightly refresh: only new rows reach a model)."""
    manifests = [
        {
            "apiVersion": API_VERSION,
            "kind": "RayJob",
            "metadata": _metadata(options.name, options),
            "spec": ray_job_spec(job, options),
        }
    ]
    if options.schedule is not None:
        spec: dict[str, Any] = {
            "schedule": options.schedule,
            "jobTemplate": ray_job_spec(job, options, command="refresh"),
        }
        if options.time_zone:
            spec["timeZone"] = options.time_zone
        manifests.append(
            {
                "apiVersion": API_VERSION,
                "kind": "RayCronJob",
                "metadata": _metadata(f"{options.name}-nightly"[:36].rstrip("-"), options),
                "spec": spec,
            }
        )
    return manifests


def volume_warnings(job: JobSpec, options: K8sOptions) -> list[str]:
    """Paths of the job that the pods will not see: they must be on the shared volume."""
    mount = PurePosixPath(options.mount)
    warnings = []
    paths = [("out", job.out)] + [(f"inputs[{i}].path", s.path) for i, s in enumerate(job.inputs)]
    for where, path in paths:
        if path is None or ":" in path.split("/")[0]:  # builtin:, hf:, s3:// ... are not files
            continue
        pure = PurePosixPath(path)
        if not pure.is_absolute() or not pure.is_relative_to(mount):
            warnings.append(f"{where}: {path} is not on the shared volume ({mount})")
    if not PurePosixPath(options.job_path).is_relative_to(mount):
        warnings.append(f"--job-path {options.job_path} is not on the shared volume ({mount})")
    return warnings


class _PlainDumper(yaml.SafeDumper):
    """No `&id001` anchors for repeated values: every pod's block reads on its own."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_manifests(manifests: list[dict[str, Any]], header: str = "") -> str:
    """YAML documents separated by `---`, key order kept (apiVersion, kind, metadata, spec)."""
    body = "---\n".join(
        yaml.dump(m, Dumper=_PlainDumper, sort_keys=False, width=100) for m in manifests
    )
    return header + body
