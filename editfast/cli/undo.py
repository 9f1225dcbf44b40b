"""``editfast undo``: a run cut after K edits (a batch boundary), written as a run of its own; with
--save-model also the weights the run had then (the base model with the journal's batches replayed)."""

from __future__ import annotations

from pathlib import Path

import click

from editfast.cli.options import force_option, out_option, quiet_option
from editfast.cli.shared import save_model_to
from editfast.core.paths import write_json
from editfast.models.load import load_model
from editfast.session.export import model_card, run_edits
from editfast.session.journal import load_run, write_entries
from editfast.session.outputs import OutputDir
from editfast.session.session import apply_entries


@click.command("undo")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--to", "to", type=click.IntRange(0), required=True,
              help="Number of edits to keep (a batch boundary of the run).")
@out_option("Directory for the run cut after K edits (session.json, journal/).")
@click.option("--save-model", is_flag=True, help="Also write the model as it was after K edits into OUT/model.")
@click.option("--model", default=None, help="The run's model, if it was loaded from another path.")
@force_option
@quiet_option
def undo_cmd(run, to, out, save_model, model, force, quiet):
    """The run's weights after K edits: the base model with the journal's batches 1..K replayed
    (exact: the same weights the run had after K edits)."""
    config, entries = load_run(run)
    ends = [0] + [e.end for e in entries]
    if to > ends[-1]:
        raise click.UsageError(f"--to {to} is outside the run, which has {ends[-1]} edits")
    if to not in ends:
        raise click.UsageError(f"--to {to} is not a batch boundary of the run (batches end at "
                               f"{', '.join(map(str, ends[1:]))})")
    if out.resolve() == run.resolve():
        raise click.UsageError("--out must differ from the run directory")
    with OutputDir(out, staged=True, force=force) as od:
        keep = entries[: ends.index(to)]
        lm = None
        if save_model:
            lm = load_model(model or config["model"], dtype=config.get("dtype", "float32").replace("torch.", ""))
            config, entries = load_run(run, lm)  # names, shapes and the model's fingerprint checked
            apply_entries(lm, config, keep)  # the updates, and a routed method's memory
        write_entries(od.path, keep)
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        write_json(od.path / "session.json", {"config": {**cfg, "undone_from": str(run), "edits": to},
                                              "hparams": config.get("_hparams"), "templates": config.get("_templates")})
        if lm is not None:
            save_model_to(lm, od.path, model_card(config, config.get("_hparams"), run_edits(run, config, to)))
    click.echo(f"{len(keep)} batches ({to} edits) of {run} -> {out}")
