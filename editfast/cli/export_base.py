"""``editfast export-base``: a model (any spec editfast loads) as a folder in Hugging Face layout."""

from __future__ import annotations

from pathlib import Path

import click

from editfast.cli.options import DTYPES, quiet_option
from editfast.session.export import export_base


@click.command("export-base")
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dtype", type=DTYPES, default="float32", show_default=True, help="dtype of the written weights.")
@click.option("--force", is_flag=True, help="Replace what OUT holds (only once the model has loaded).")
@quiet_option
def export_base_cmd(model, out, dtype, force, quiet):
    """A model (smollm2-135m, a .gguf file, a random: preset, ...) as a folder in Hugging Face layout,
    for transformers and PEFT's AutoPeftModelForCausalLM.

    MODEL is any model editfast loads (also a Hub id in the local cache, or a folder); OUT gets its
    config, safetensors and tokenizer: transformers' from_pretrained(OUT) loads it, and 'editfast
    export RUN --lora DIR --base OUT' names it in the adapter."""
    if not str(out).strip():
        raise click.UsageError("OUT must name a directory, got an empty path")
    s = export_base(model, out, dtype=dtype, force=force)
    click.echo(f"{model} ({dtype}, fingerprint {s['model_fingerprint'][:12]}) -> {out}")
