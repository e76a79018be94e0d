"""`twotower verify`: every file of a run against its recorded checksums and fingerprint (`retrieval/verify.py`)."""

from __future__ import annotations

import typer

from twotower_cli.cli.common import command, run_of
from twotower_cli.cli.console import out, print_json
from twotower_cli.cli.main import app
from twotower_cli.cli.options import ConfigOpt, JsonOpt, RunOpt, RunsDirOpt


@command(app, "verify", short_help="Check every file of a run against its checksums",
         help="Check every file of a run (model, run record, every index) against what was recorded "
                             "when it was written; exit 1 when anything is damaged.")
def verify_command(run: RunOpt = None, json_out: JsonOpt = False, runs_dir: RunsDirOpt = None,
                   config: ConfigOpt = None) -> None:
    from twotower_cli.retrieval.verify import verify_run

    _, run_dir = run_of(runs_dir, run, config)
    checks = verify_run(run_dir)
    bad = [c for c in checks if not c.ok]
    if json_out:
        print_json({"run": run_dir.name, "ok": not bad, "checks": [c.to_dict() for c in checks]})
    else:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"run {run_dir.name}", title_justify="left")
        for col in ("checked", "", "detail"):
            table.add_column(col)
        for c in checks:
            table.add_row(escape(c.what), "[green]ok[/]" if c.ok else "[red]damaged[/]", escape(c.detail))
        out.print(table)
        out.print(f"{len(checks) - len(bad)} of {len(checks)} checks passed", highlight=False)
    if bad:
        raise typer.Exit(1)
