"""``editfast export``: a run's edits as a PEFT LoRA adapter (its warnings said once, on stderr)."""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from editfast.cli.options import DTYPES, directory, quiet_option
from editfast.session.export import lora_from_run


@click.command("export")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--lora", "lora", type=click.Path(file_okay=False), required=True, callback=lambda c, p, v: directory(v),
              help="Directory for a PEFT LoRA adapter of the run's edits (adapter_config.json, "
                   "adapter_model.safetensors, README.md).")
@click.option("--model", default=None, help="The run's base model, if it was loaded from another path.")
@click.option("--to", "to", type=int, default=None, help="Export the first K edits (a batch boundary; default all).")
@click.option("--dtype", type=DTYPES, default="float32", show_default=True,
              help="dtype of the adapter's tensors.")
@click.option("--base", "base", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The base model's folder in Hugging Face layout (editfast export-base MODEL DIR), named in the "
                   "adapter (default: the model's own folder, or its Hub id).")
@click.option("--force", is_flag=True, help="Replace what --lora holds (only once every check passed).")
@quiet_option
def export_cmd(run, lora, model, to, dtype, base, force, quiet):
    """A PEFT LoRA adapter of the run's edits: loaded with peft on the base model it is the edited
    model (servable by vLLM's multi-LoRA where the rank is at most 512)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the summary's warnings are said below, once
        s = lora_from_run(run, lora, model=model, to=to, dtype=dtype, force=force, base=base)
    for w in s["warnings"]:
        click.echo(f"editfast: warning: {w}", err=True)
    click.echo(f"{s['edits']} edits ({s['batches']} batches, {s['method']}) of {run} -> {lora}: LoRA rank {s['r']} "
               f"on {len(s['target_modules'])} module(s) ({', '.join(s['target_modules'])}); base model {s['base_model']}")
