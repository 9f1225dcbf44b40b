"""``editfast study``: a study file's grid of sequential editing sessions on one model and dataset,
into --out (resumable): study.json, report.md, one plot per task and one run per session."""

from __future__ import annotations

from pathlib import Path

import click

from editfast.cli.exits import note_on_failure
from editfast.cli.options import force_option, out_option, quiet_option
from editfast.session.journal import Journal
from editfast.session.outputs import OutputDir
from editfast.session.study import load_study, run_study


def has_runs(out: Path) -> bool:
    """Whether a study folder holds a session with a journal."""
    return any(Journal(r).exists() for r in (out / "runs").glob("*"))


@click.command("study")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@out_option("Directory for study.json, report.md, plots/ and one run per session in runs/.")
@click.option("--profile", default=None, help="A profile of the study file (e.g. quick).")
@click.option("--resume", is_flag=True, help="Continue an interrupted study in --out.")
@force_option
@quiet_option
def study_cmd(config, out, profile, resume, force, quiet):
    """A grid of sequential editing sessions (methods x settings) on one model and dataset: ability
    against the number of edits, with study.json, report.md and one plot per task."""
    if resume and force:
        raise click.UsageError("--resume and --force exclude each other")
    study = load_study(config, profile)
    with OutputDir(out, resume=resume, force=force, keep=has_runs) as od:
        od.start()
        with note_on_failure(lambda: f"{out} keeps the finished batches of its sessions: continue with --resume"
                             if has_runs(out) else None):
            res = run_study(study, out, progress=not quiet, resume=resume)
    click.echo(res["report_md"])
    click.echo(f"study: {out / 'study.json'}")
