"""`winnow k8s JOB.yaml`: KubeRay manifests for the job (engine.cluster.kuberay), validated
offline against the KubeRay CRDs (engine.cluster.crd_validate) before they are printed.

stdout (or --out FILE) carries the manifests, ready for `kubectl apply -f -`; notes (paths the
pods will not see, where the CRDs were read from) go to stderr like every other command's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

EXIT_INVALID_MANIFEST = 5  # the CRD or the operator would refuse it (a bad --name, --schedule)


def register(app: typer.Typer) -> None:
    from engine.cli import EXIT_CONFIG, _fail, _read_job, console
    from engine.config import ConfigError, load_job

    @app.command()
    def k8s(
        job_file: Annotated[Path, typer.Argument(help="job spec YAML")],
        out: Annotated[
            Path | None, typer.Option("--out", help="write the manifests here (default: stdout)")
        ] = None,
        image: Annotated[
            str | None,
            typer.Option(
                "--image",
                help="image with Winnow installed (default: rayproject/ray:<pinned Ray>-py311 "
                "+ `pip install winnow`, built by you)",
            ),
        ] = None,
        gpu_image: Annotated[
            str | None, typer.Option("--gpu-image", help="image of the GPU workers")
        ] = None,
        schedule: Annotated[
            str | None,
            typer.Option(
                "--schedule", help='also a RayCronJob running `refresh`, e.g. "0 2 * * *"'
            ),
        ] = None,
        time_zone: Annotated[
            str | None, typer.Option("--time-zone", help="the schedule's zone, e.g. Europe/Paris")
        ] = None,
        name: Annotated[str, typer.Option("--name", help="the RayJob's name")] = "winnow",
        namespace: Annotated[str | None, typer.Option("--namespace")] = None,
        pvc: Annotated[
            str, typer.Option("--pvc", help="PersistentVolumeClaim with inputs, outputs, cache")
        ] = "winnow-data",
        mount: Annotated[str, typer.Option("--mount", help="where pods mount it")] = "/data",
        job_path: Annotated[
            str | None,
            typer.Option("--job-path", help="the job spec on the volume (default MOUNT/jobs/NAME)"),
        ] = None,
        secret: Annotated[
            str, typer.Option("--secret", help="Secret holding API keys (key = env var name)")
        ] = "winnow-api-keys",
        ttl: Annotated[
            int, typer.Option("--ttl", help="seconds the finished cluster is kept", min=0)
        ] = 3600,
        cpus_per_worker: Annotated[int, typer.Option("--cpus-per-worker", min=2)] = 8,
        gpus_per_worker: Annotated[int, typer.Option("--gpus-per-worker", min=1)] = 1,
        schemas: Annotated[
            Path | None,
            typer.Option(
                "--schemas",
                help="folder of KubeRay CRD YAML files to validate against (default: "
                "../shared/schemas/kuberay beside the checkout, when present)",
            ),
        ] = None,
    ) -> None:
        """Print a KubeRay RayJob (and with --schedule a RayCronJob) for the job: worker groups
        sized from the stages' resources, a shared volume for data and the score cache."""
        from engine.cluster.crd_validate import DEFAULT_SCHEMAS, ManifestError, check_manifests
        from engine.cluster.crd_validate import load_schemas as load_crds
        from engine.cluster.kuberay import (
            K8sOptions,
            build_manifests,
            dump_manifests,
            volume_warnings,
        )

        try:
            job = _read_job(lambda: load_job(job_file))
        except ConfigError as exc:
            _fail(f"invalid job spec:\n{exc}", EXIT_CONFIG)
        options = K8sOptions(
            job_path=job_path or f"{mount.rstrip('/')}/jobs/{job_file.name}",
            name=name,
            namespace=namespace,
            image=image,
            gpu_image=gpu_image,
            pvc=pvc,
            mount=mount,
            schedule=schedule,
            time_zone=time_zone,
            ttl_seconds=ttl,
            secret=secret,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
        )
        manifests = build_manifests(job, options)
        folder = schemas or DEFAULT_SCHEMAS
        if folder.is_dir():
            try:
                check_manifests(manifests, load_crds(folder))
            except ManifestError as exc:
                _fail(f"the manifest would be refused:\n{escape(str(exc))}", EXIT_INVALID_MANIFEST)
            except (OSError, KeyError, TypeError) as exc:
                _fail(f"cannot read the CRDs in {folder}: {exc}", EXIT_CONFIG)
            console.print(f"[dim]validated against the CRDs in {escape(str(folder))}[/]")
        elif schemas is not None:
            _fail(f"--schemas {schemas}: not a folder", EXIT_CONFIG)
        else:
            console.print("[yellow]note:[/] no KubeRay CRDs found; the manifest is not validated")
        for line in volume_warnings(job, options):
            console.print(f"[yellow]warning:[/] {escape(line)}")
        header = (
            f"# winnow k8s {job_file.name}: copy the job spec to {options.job_path} on the "
            f"volume (PVC {pvc}).\n# The image must have Winnow installed.\n"
        )
        text = dump_manifests(manifests, header)
        if out is None:
            print(text, end="")
        else:
            out.write_text(text, encoding="utf-8")
            console.print(f"manifests: [bold]{escape(str(out))}[/]")
