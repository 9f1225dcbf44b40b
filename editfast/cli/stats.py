"""``editfast stats import | export``: the original ROME/MEMIT/EasyEdit statistics files (.npz) into
and out of editfast's cache, for one layer of a model."""

from __future__ import annotations

from pathlib import Path

import click

from editfast.cli.options import (
    DTYPES,
    file_options,
    hparams_option,
    method_option,
    model_option,
    quiet_option,
    sets_option,
)
from editfast.methods.hparams import parse_overrides
from editfast.methods.locate_then_edit.stats import stats_location
from editfast.methods.locate_then_edit.stats_files import export_npz, file_hparams, import_npz, read_npz
from editfast.methods.registry import resolve_hparams
from editfast.models.load import load_model, model_config


@click.group("stats")
def stats_group() -> None:
    """Import the originals' statistics files (.npz) into editfast's cache, or export them."""


def stats_options(f):
    """The options both subcommands take: the model, layer and hyper-parameters of the statistics."""
    for opt in reversed([
        model_option,
        click.option("--layer", type=click.IntRange(0), default=None, help="The layer (import: read from the file "
                     "name where it names the module)."),
        method_option(locate_then_edit=True, help="Whose preset gives the statistics' hyper-parameters (corpus, "
                      "texts, token cut) not set otherwise."),
        hparams_option("YAML/JSON hyper-parameters, as for 'edit' (its stats_dir is the cache location)."),
        sets_option("Override one hyper-parameter."),
        click.option("--dtype", type=DTYPES, default="float32",
                     show_default=True, help="The weights' dtype the edits will use (part of the cache key)."),
        quiet_option,
    ]):
        f = opt(f)
    return f


def stats_setup(model, layer, method, hparams_file, sets, dtype, from_file: dict):
    """The statistics' hyper-parameters (checked before the model loads) and the cache location."""
    params = dict(method=method, model=model, dtype=dtype)
    opts = file_options(hparams_file, params)
    overrides = {"layers": [layer if layer is not None else 0], **from_file, **parse_overrides(sets)}
    hp = resolve_hparams(params["method"], params["model"], model_config(params["model"]), overrides, hparams_file,
                         options={})
    return hp, params, opts.get("stats_dir")


@stats_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@stats_options
def stats_import_cmd(file, model, layer, method, hparams_file, sets, dtype, quiet):
    """Read an original statistics FILE.npz into editfast's cache, for later edits of MODEL with the same
    corpus, number of texts, token cut and dtypes (taken from the file's name where it says them)."""
    read_npz(file)  # a bad file fails before the model loads
    hp, params, stats_dir = stats_setup(model, layer, method, hparams_file, sets, dtype, file_hparams(file))
    with stats_location(stats_dir):
        lm = load_model(params["model"], dtype=params["dtype"])
        l, target = import_npz(file, lm, layer, hp)
    click.echo(f"layer {l} of {params['model']}: {file} -> {target} ({hp.mom2_dataset}, {hp.mom2_n_samples} texts, "
               f"mom2_max_tokens {hp.mom2_max_tokens}, {hp.mom2_dtype})")


@stats_group.command("export")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .npz file to write (the originals name it "
                   "<model>/<dataset>_stats/<module>_<dtype>_mom2_<n>.npz).")
@stats_options
def stats_export_cmd(out, model, layer, method, hparams_file, sets, dtype, quiet):
    """Write editfast's statistics of one layer (cached, else computed now) as an original .npz file."""
    if layer is None:
        raise click.UsageError("--layer is required for export")
    if out.suffix != ".npz":
        raise click.UsageError(f"--out must name a .npz file, got {out}")
    hp, params, stats_dir = stats_setup(model, layer, method, hparams_file, sets, dtype, {})
    with stats_location(stats_dir):
        lm = load_model(params["model"], dtype=params["dtype"])
        export_npz(lm, layer, hp, out, progress=not quiet)
    click.echo(f"layer {layer} of {params['model']} -> {out}")
