"""`winnow cache stats|compact|gc`: the score cache's upkeep (engine.cache_admin)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

CacheDirOption = Annotated[
    Path | None,
    typer.Option("--dir", help="score cache folder (default: $WINNOW_CACHE/scores)"),
]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def register(app: typer.Typer) -> None:
    from engine.cli import EXIT_CONFIG, _fail, console

    cache_app = typer.Typer(
        add_completion=False,
        no_args_is_help=True,
        help="Score-cache upkeep: each run appends a file per fingerprint; merge and prune them.",
    )
    app.add_typer(cache_app, name="cache")

    @cache_app.command("stats")
    def stats_cmd(
        cache_dir: CacheDirOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    ) -> None:
        """Per fingerprint folder: files, rows, bytes, last write and last use."""
        from engine import cache_admin

        found = cache_admin.stats(cache_dir)
        if as_json:
            print(json.dumps([s.as_dict() for s in found], indent=2))
            return
        table = Table("fingerprint", "files", "rows", "bytes", "last write", "last use")
        for s in found:
            table.add_row(
                s.fingerprint,
                f"{s.files} ({s.damaged} damaged)" if s.damaged else str(s.files),
                str(s.rows),
                _size(s.bytes),
                s.last_write or "-",
                s.last_used or "-",
            )
        console.print(table)
        console.print(
            f"{len(found)} fingerprints, {sum(s.files for s in found)} files, "
            f"{sum(s.rows for s in found)} rows, {_size(sum(s.bytes for s in found))}"
        )

    @cache_app.command("compact")
    def compact_cmd(
        cache_dir: CacheDirOption = None,
        fingerprint: Annotated[
            list[str] | None, typer.Option("--fingerprint", help="only these folders")
        ] = None,
        min_files: Annotated[
            int, typer.Option("--min-files", help="leave folders with fewer files alone")
        ] = 2,
    ) -> None:
        """Merge each folder's part files into one (one row per id)."""
        from engine import cache_admin

        for r in cache_admin.compact(cache_dir, fingerprint, max(min_files, 1)):
            console.print(
                f"{r.fingerprint}: {r.files_before} → {r.files_after} files, "
                f"{r.rows_before} → {r.rows_after} rows"
            )

    @cache_app.command("gc")
    def gc_cmd(
        cache_dir: CacheDirOption = None,
        older_than: Annotated[
            str | None,
            typer.Option("--older-than", help="remove folders unused for this long: 30d, 12h"),
        ] = None,
        keep_run: Annotated[
            list[Path] | None,
            typer.Option("--keep-run", help="keep the fingerprints this run's manifest used"),
        ] = None,
        keep: Annotated[
            list[str] | None, typer.Option("--keep", help="keep this fingerprint")
        ] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="only say what would go")] = False,
    ) -> None:
        """Remove fingerprint folders not used for a while and/or not kept by a run."""
        from engine import cache_admin

        try:
            age = cache_admin.parse_age(older_than) if older_than is not None else None
            kept: set[str] | None = None
            if keep_run or keep:
                kept = set(keep or [])
                for run_dir in keep_run or []:
                    kept |= cache_admin.run_fingerprints(run_dir)
            decisions = cache_admin.gc(cache_dir, age, kept, dry_run=dry_run)
        except (ValueError, OSError) as exc:
            _fail(escape(str(exc)), EXIT_CONFIG)
        verb = "would remove" if dry_run else "removed"
        freed = 0
        for d in decisions:
            if d.action == "remove":
                freed += d.bytes
                console.print(f"{verb} {d.fingerprint} ({_size(d.bytes)}): {d.why}")
            else:
                console.print(f"[dim]kept {d.fingerprint}: {d.why}[/]")
        console.print(f"{verb} {_size(freed)}")
