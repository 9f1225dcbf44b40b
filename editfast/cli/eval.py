"""``editfast eval``: general abilities (eight task categories + WikiText perplexity) of a model, or
before and after applying an edit run's journal (--edits), into --out: eval.json, report.md, tasks/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from editfast.cli.options import (
    device_option,
    dtype_option,
    force_option,
    max_memory_option,
    model_option,
    out_option,
    quiet_option,
    seed_option,
)
from editfast.cli.shared import join_ranks
from editfast.core.distributed import agree, rank_out
from editfast.eval.runner import evaluate, markdown_table, write_report
from editfast.eval.tasks import resolve_tasks
from editfast.models.load import load_model
from editfast.session.journal import load_run
from editfast.session.outputs import OutputDir
from editfast.session.session import apply_entries


def check_engine(engine: str) -> None:
    """--engine vllm: refused (not installed, or not implemented in this version)."""
    if engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise click.UsageError("--engine vllm needs vLLM, which is not installed (pip install vllm, on a CUDA "
                                   "machine); the default engine runs everywhere")
        raise click.UsageError("--engine vllm is not implemented in this version: evaluate with the default engine "
                               "(under torchrun for several GPUs), or serve the base model with vLLM and the adapter "
                               "of 'editfast export RUN --lora DIR' yourself")


@click.command("eval")
@model_option
@click.option("--edits", "edits", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="An 'editfast edit' output directory: evaluate before and after applying its edits.")
@click.option("--tasks", default="all", show_default=True, help="all, or a comma list: gsm8k,rte,nq,boolq,mutual,"
              "samsum,conll03,sst2,wikitext.")
@click.option("--protocol", type=click.Choice(["standard", "paper"]), default="standard", show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Examples per task (deterministic subsample by --seed).")
@seed_option
@click.option("--batch-tokens", "batch_tokens", default="auto", show_default=True,
              help="Tokens per forward batch, or 'auto' (the largest that fits).")
@out_option("Directory for eval.json, report.md, tasks/ (and change.png with --edits).")
@dtype_option
@device_option
@max_memory_option
@click.option("--log-samples", is_flag=True, help="Also write every example's prompt, target, responses and "
              "metrics as lm-evaluation-harness does: samples_<task>_<date>.jsonl (with --edits in before/, after/).")
@click.option("--engine", type=click.Choice(["editfast", "vllm"]), default="editfast", show_default=True,
              help="vllm: not available yet (see docs/models.md, Scale-out).")
@force_option
@quiet_option
def eval_cmd(model, edits, tasks, protocol, limit, seed, batch_tokens, out, dtype, device, max_memory,
             log_samples, engine, force, quiet):
    """Measure general abilities (eight task categories + WikiText perplexity)."""
    if batch_tokens != "auto":
        try:
            batch_tokens = int(batch_tokens)
            assert batch_tokens > 0
        except (ValueError, AssertionError):
            raise click.UsageError(f"--batch-tokens must be 'auto' or a positive number, got {batch_tokens!r}")
    check_engine(engine)
    resolved = [t.name for t in resolve_tasks(tasks)]
    if edits is not None:
        load_run(edits)  # the run's files, whole, before the model loads
    device, quiet = join_ranks(device, quiet, {"tasks": resolved})
    with rank_out(out) as out, OutputDir(out, staged=True, force=force) as od:
        lm = load_model(model, dtype=dtype, device=device, max_memory=max_memory)
        agree({"model_fingerprint": lm.fingerprint})
        run = load_run(edits, lm) if edits else None  # names, shapes, fingerprint: before evaluating
        before = evaluate(lm, tasks, protocol, limit, seed, batch_tokens, progress=not quiet, log_samples=log_samples)
        after = None
        if run is not None:
            apply_entries(lm, *run)  # the updates, and a routed method's memory
            after = evaluate(lm, tasks, protocol, limit, seed, batch_tokens, progress=not quiet,
                             log_samples=log_samples)
        write_report(od.path, before, after, lm.device)
    click.echo(markdown_table(before, after))
    click.echo(f"results: {out / 'eval.json'}")
