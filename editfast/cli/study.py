"""``editfast study``: a study file's grid of sequential editing sessions on one model and dataset,
into --out (resumable): study.json, report.md, one plot per task and one run per session.
``--plan`` prints the sessions and an estimate of their time (a short calibration) and writes
nothing but its cache; ``--only NAME`` runs one run, the others' finished runs read back."""

from __future__ import annotations

from pathlib import Path

import click

from editfast.cli.exits import note_on_failure
from editfast.cli.options import force_option, out_option, quiet_option
from editfast.cli.shared import preflight
from editfast.core.errors import EditfastError
from editfast.models.load import load_model
from editfast.session.journal import Journal
from editfast.session.outputs import OutputDir
from editfast.session.plan import evaluators, plan_md, plan_study
from editfast.session.study import (
    check_study,
    holds_study,
    load_study,
    run_study,
    same_study,
)


def has_runs(out: Path) -> bool:
    """Whether a study folder holds a session with a journal."""
    return any(Journal(r).exists() for r in (out / "runs").glob("*"))


@click.command("study")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@out_option("Directory for study.json, report.md, plots/ and one run per session in runs/.", required=False)
@click.option("--profile", default=None, help="A profile of the study file (e.g. quick).")
@click.option("--resume", is_flag=True, help="Continue an interrupted study in --out (the same study file only).")
@click.option("--only", "only", multiple=True, metavar="NAME",
              help="Run only this run of the study (repeatable); the others' finished runs in --out are read back "
                   "and the report says which are missing.")
@click.option("--plan", "plan", is_flag=True,
              help="Print the sessions, edits, checkpoints, tasks and an estimated time per session (a short, "
                   "cached calibration on this machine); run nothing, write nothing into --out.")
@force_option
@quiet_option
def study_cmd(config, out, profile, resume, only, plan, force, quiet):
    """A grid of sequential editing sessions (methods x settings) on one model and dataset: ability
    against the number of edits, with study.json, report.md and one plot per task."""
    if resume and force:
        raise click.UsageError("--resume and --force exclude each other")
    if out is None and not plan:
        raise click.UsageError("Missing option '--out' (only --plan runs without one).")
    study = load_study(config, profile)
    names = [r["name"] for r in study["runs"]]
    for name in only:
        if name not in names:
            raise EditfastError(f"--only: the study has no run {name!r} (runs: {', '.join(names)})")
    requests = check_study(study, lambda model, method, overrides, dtype: preflight(model, method, None, overrides,
                                                                                  dtype=dtype))
    if plan:
        lm = load_model(study.get("model", "smollm2-135m"), dtype=study.get("dtype", "float32"),
                        device=study.get("device", "cpu"))
        click.echo(plan_md(plan_study(study, lm, requests, evaluators(lm, study), progress=not quiet)))
        return
    if resume and not holds_study(out):
        raise EditfastError(f"--resume: {out} holds no study to continue; start it without --resume")
    held = holds_study(out) and (resume or bool(only))
    if held:
        same_study(out, study)  # before the folder is touched
    with OutputDir(out, resume=held, force=force, keep=has_runs) as od:
        od.start()
        with note_on_failure(lambda: f"{out} keeps the finished batches of its sessions: continue with --resume"
                             if has_runs(out) else None):
            res = run_study(study, out, progress=not quiet, resume=resume, only=list(only) or None, requests=requests)
    click.echo(res["report_md"])
    click.echo(f"study: {out / 'study.json'}")
