"""`winnow submit` and `winnow jobs status|logs|stop`: Winnow as a Ray job (engine.cluster.submit).

stdout carries what scripts need (the submission id; `jobs status` the status; `jobs logs` the
logs); what people read (notes, how to follow the job) goes to stderr like every other command.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

EXIT_JOB_FAILED = 1
EXIT_CLUSTER = 5  # the dashboard cannot be reached or refused the request (4: EXIT_LOCKED)

AddressOption = Annotated[
    str,
    typer.Option(
        "--address",
        envvar="RAY_API_SERVER_ADDRESS",
        help="the Ray dashboard of the cluster, http://HEAD:8265 ($RAY_API_SERVER_ADDRESS)",
    ),
]


def _env_pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{item!r}: use NAME=VALUE", param_hint="--env")
        pairs[name] = value
    return pairs


def register(app: typer.Typer) -> None:
    from engine.cli import EXIT_CONFIG, _fail, _read_job, console
    from engine.config import ConfigError, load_job

    def jobs_client(address: str) -> Any:
        """Ray's JobSubmissionClient (imported lazily: ray is slow to import)."""
        from engine.cluster.submit import client

        try:
            return client(address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            _fail(f"cannot reach the Ray dashboard at {address}: {escape(str(exc))}", EXIT_CLUSTER)

    def cluster_call(what: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (ConnectionError, RuntimeError, ValueError) as exc:
            _fail(f"{what}: {escape(str(exc))}", EXIT_CLUSTER)

    @app.command()
    def submit(
        job_file: Annotated[Path, typer.Argument(help="job spec YAML")],
        address: AddressOption,
        out: Annotated[
            str | None,
            typer.Option("--out", help="overrides `out:`; an absolute path every node sees"),
        ] = None,
        no_wait: Annotated[
            bool, typer.Option("--no-wait", help="print the submission id and return")
        ] = False,
        working_dir: Annotated[
            Path | None,
            typer.Option(
                "--working-dir", help="folder uploaded as the job's code (default: project root)"
            ),
        ] = None,
        job_on_cluster: Annotated[
            bool,
            typer.Option(
                "--job-on-cluster",
                help="JOB_FILE is an absolute path the cluster sees (shared storage): pass it "
                "as is instead of uploading it with the working directory",
            ),
        ] = False,
        code_on_cluster: Annotated[
            bool,
            typer.Option(
                "--code-on-cluster",
                help="every node sees the working directory at this path (shared storage): "
                "run the code in place instead of uploading it",
            ),
        ] = False,
        env: Annotated[
            list[str] | None,
            typer.Option("--env", help="NAME=VALUE for the job (never secrets); repeatable"),
        ] = None,
        submission_id: Annotated[
            str | None, typer.Option("--submission-id", help="default: chosen by Ray")
        ] = None,
        timeout: Annotated[
            float | None, typer.Option("--timeout", help="give up waiting after SECONDS")
        ] = None,
    ) -> None:
        """Run a job spec on a Ray cluster through the Ray Jobs API; waits and streams the
        job's logs unless --no-wait."""
        from engine.cluster.submit import (
            SubmitError,
            follow_logs,
            plan_submission,
            project_root,
            submit,
            wait_for,
        )

        try:
            job = _read_job(lambda: load_job(job_file))
        except ConfigError as exc:
            _fail(f"invalid job spec {job_file}:\n{exc}", EXIT_CONFIG)
        root = working_dir or project_root()
        if root is None:
            _fail(
                "no project root found: pass --working-dir (the folder holding engine/)",
                EXIT_CONFIG,
            )
        try:
            plan = plan_submission(
                job_file if job_on_cluster else job_file.absolute(),
                job,
                working_dir=root,
                out=out,
                job_on_cluster=job_on_cluster,
                code_on_cluster=code_on_cluster,
                env=_env_pairs(env or []),
            )
        except SubmitError as exc:
            _fail(escape(str(exc)), EXIT_CONFIG)
        for note in plan.notes:
            console.print(f"[yellow]note:[/] {escape(note)}")
        for path in plan.big_files:
            console.print(f"[yellow]not uploaded (10 MiB or more):[/] {escape(path)}")
        if plan.cluster_env:
            console.print(
                "[yellow]the cluster's environment must define:[/] "
                + ", ".join(plan.cluster_env)
                + " (secrets are never sent with a job)"
            )
        jobs = jobs_client(address)
        job_id = cluster_call("submission refused", lambda: submit(jobs, plan, submission_id))
        console.print(
            f"[green]submitted:[/] {escape(job_id)} ({plan.upload_bytes / 2**20:.1f} MiB of code) "
            f"running: {escape(plan.entrypoint)}"
        )
        follow = f"winnow jobs logs {job_id} --address {address} --follow"
        console.print(f"follow it: {escape(follow)}")
        print(job_id, flush=True)
        if no_wait:
            return
        if timeout is None:
            cluster_call("log stream", lambda: follow_logs(jobs, job_id, _write_err))
        try:
            status = wait_for(jobs, job_id, timeout_s=timeout)
        except TimeoutError as exc:
            _fail(f"{exc}; it keeps running: {follow}", EXIT_JOB_FAILED)
        _report_end(jobs, job_id, status)

    def _report_end(jobs: Any, job_id: str, status: str) -> None:
        if status == "SUCCEEDED":
            console.print(f"[bold green]{job_id}: SUCCEEDED[/]")
            return
        info = jobs.get_job_info(job_id)
        _fail(f"{job_id}: {status}: {escape(info.message or '')}", EXIT_JOB_FAILED)

    jobs_app = typer.Typer(
        add_completion=False, no_args_is_help=True, help="Inspect or stop submitted Ray jobs."
    )
    app.add_typer(jobs_app, name="jobs")

    @jobs_app.command("status")
    def status_cmd(
        job_id: Annotated[str, typer.Argument(help="submission id")], address: AddressOption
    ) -> None:
        """Print the job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
        jobs = jobs_client(address)
        info = cluster_call("status", lambda: jobs.get_job_info(job_id))
        if info.message and str(info.status) != "SUCCEEDED":
            console.print(f"[dim]{escape(info.message)}[/]")
        print(str(info.status))

    @jobs_app.command("logs")
    def logs_cmd(
        job_id: Annotated[str, typer.Argument(help="submission id")],
        address: AddressOption,
        follow: Annotated[
            bool, typer.Option("--follow", "-f", help="keep printing until the job ends")
        ] = False,
    ) -> None:
        """Print the job's logs (the driver's output: stage lines and the final counts)."""
        from engine.cluster.submit import follow_logs

        jobs = jobs_client(address)
        if follow:
            cluster_call("log stream", lambda: follow_logs(jobs, job_id, _write_out))
        else:
            sys.stdout.write(cluster_call("logs", lambda: jobs.get_job_logs(job_id)))

    @jobs_app.command("stop")
    def stop_cmd(
        job_id: Annotated[str, typer.Argument(help="submission id")], address: AddressOption
    ) -> None:
        """Ask Ray to stop the job (its driver gets SIGTERM, then SIGKILL)."""
        jobs = jobs_client(address)
        stopped = cluster_call("stop", lambda: jobs.stop_job(job_id))
        console.print(
            f"{escape(job_id)}: stop requested" if stopped else f"{escape(job_id)}: not running"
        )


def _write_err(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _write_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
