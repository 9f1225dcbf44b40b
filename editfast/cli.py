"""Command line: ``editfast edit ...``.

Errors a user can cause print one line on stderr and exit with code 2; nothing is written
unless the whole job succeeded (files go to a temporary name and are renamed).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import click

COUNTERFACT_500 = 500  # records in the shipped "counterfact" dataset (full ROME schema)


def fail(message: str) -> None:
    click.echo(f"editfast: error: {message}", err=True)
    sys.exit(2)


def parse_set(values: tuple[str, ...]) -> dict:
    """--set key=value (value parsed as YAML: numbers, booleans, lists)."""
    import yaml

    out = {}
    for item in values:
        if "=" not in item:
            raise click.UsageError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def check_out_dir(out: Path) -> bool:
    """Make sure ``out`` can be written before any work; return whether it was created here."""
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe."):
            pass
    except OSError as e:
        raise click.UsageError(f"output directory {str(out)!r} is not writable: {e.strerror or e}")
    return created


def summary_table(result) -> str:
    s = result.summary
    rows = []
    if s["metric_kind"] == "counterfact":
        names = [("efficacy", "efficacy_success"), ("efficacy magnitude", "efficacy_magnitude"),
                 ("paraphrase", "paraphrase_success"), ("neighbourhood", "neighborhood_success")]
    else:
        names = [("rewrite acc", "rewrite_acc"), ("paraphrase acc", "paraphrase_acc"),
                 ("neighbourhood acc", "neighborhood_acc")]
    rows.append(f"{'metric':<22}{'before':>10}{'after':>10}")
    for label, key in names:
        pre, post = s.get("pre", {}).get(key), s.get("post", {}).get(key)
        fmt = lambda x: "     -" if x is None else f"{x:10.3f}"
        rows.append(f"{label:<22}{fmt(pre)}{fmt(post)}")
    t = result.timings
    rows.append("")
    rows.append(f"edits {s['n']} · {result.config['batch_size']} per batch · edit {t['edit_s']:.1f}s "
                f"({t['edits_per_s']:.2f} edits/s) · targets {t['targets_s']:.1f}s · statistics {t['statistics_s']:.1f}s "
                f"· total {t['total_s']:.1f}s")
    return "\n".join(rows)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="editfast")
def cli() -> None:
    """Fast locate-then-edit knowledge editing (ROME, MEMIT) and its side effects."""


@cli.command("edit")
@click.option("--method", type=click.Choice(["rome", "memit"], case_sensitive=False), default="memit", show_default=True)
@click.option("--n", "n", type=int, default=10, show_default=True, help="Number of edits.")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Model: HF directory, .gguf file, 'smollm2-135m' or 'random:<preset>'.")
@click.option("--dataset", default=None,
              help="counterfact (500 full ROME records), counterfact-full (21,605 requests), zsre, or a "
                   "JSON/JSONL file of requests. Default: counterfact, or counterfact-full when --offset + "
                   "--n exceeds 500.")
@click.option("--offset", type=int, default=0, show_default=True, help="Skip this many dataset records.")
@click.option("--batch-size", type=int, default=None, help="MEMIT edits per batch (default: all at once). ROME: 1.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for results.json, journal.safetensors (and the model with --save-model).")
@click.option("--save-model", is_flag=True, help="Also write the edited model as safetensors into OUT/model.")
@click.option("--hparams", "hparams_file", type=click.Path(path_type=Path), default=None,
              help="YAML/JSON file of hyper-parameters (original ROME/MEMIT keys) over the model's preset.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one hyper-parameter (repeatable).")
@click.option("--templates", type=click.Choice(["generated", "fixed"]), default="generated", show_default=True,
              help="Context templates: sampled from the model with --seed, or a fixed set.")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--no-eval", is_flag=True, help="Skip the edit metrics.")
@click.option("--eval", "eval_tasks", default=None, metavar="TASKS",
              help="Also evaluate general abilities before and after editing (all, or e.g. gsm8k,rte).")
@click.option("--eval-limit", type=int, default=None, help="Examples per task for --eval.")
@click.option("--protocol", type=click.Choice(["standard", "paper"]), default="standard", show_default=True,
              help="Evaluation protocol for --eval.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def edit_cmd(method, n, model, dataset, offset, batch_size, seed, out, save_model, hparams_file, sets, templates,
             dtype, device, no_eval, eval_tasks, eval_limit, protocol, quiet):
    """Apply N edits from a dataset, report efficacy, paraphrase and neighbourhood scores."""
    from .api import edit
    from .data import load_dataset
    from .hparams import resolve_hparams
    from .models import load_model

    if n < 1:
        raise click.UsageError(f"--n must be >= 1, got {n}")
    if batch_size is not None and batch_size < 1:
        raise click.UsageError(f"--batch-size must be >= 1, got {batch_size}")
    overrides = parse_set(sets)
    chosen = dataset is None and offset + n > COUNTERFACT_500
    dataset = dataset or ("counterfact-full" if chosen else "counterfact")
    requests = load_dataset(dataset, n, offset=offset)
    if chosen:
        click.echo(f"editfast: --offset + --n > {COUNTERFACT_500}: using --dataset counterfact-full", err=True)
    if eval_tasks:
        from .eval.tasks import resolve_tasks

        resolve_tasks(eval_tasks)  # unknown task names fail before any work
        if eval_limit is not None and eval_limit <= 0:
            raise click.UsageError(f"--eval-limit must be >= 1, got {eval_limit}")
    created = check_out_dir(out)
    try:
        lm = load_model(model, dtype=dtype, device=device)
        hp = resolve_hparams(method, lm.spec, lm.model.config, overrides, hparams_file)
        before = None
        if eval_tasks:
            from .eval.runner import evaluate

            before = evaluate(lm, eval_tasks, protocol, eval_limit, seed, progress=not quiet)
        result = edit(lm, requests, method, hparams=hp, batch_size=batch_size, seed=seed, templates=templates,
                      evaluate=not no_eval, progress=not quiet)
        if eval_tasks:
            from .eval.runner import markdown_table, write_report

            after = evaluate(lm, eval_tasks, protocol, eval_limit, seed, progress=not quiet)
            write_report(out / "eval", before, after)
        if save_model:
            target = out / "model"
            tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=out))
            try:
                lm.model.save_pretrained(tmp, safe_serialization=True)
                lm.tokenizer.save_pretrained(tmp)
                if target.exists():
                    shutil.rmtree(target)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        result.save(out)
    except BaseException:
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise
    click.echo(summary_table(result))
    if eval_tasks:
        click.echo("\n" + markdown_table(before, after))
    click.echo(f"results: {out / 'results.json'}")


@cli.command("eval")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Model: HF directory, .gguf file, 'smollm2-135m' or 'random:<preset>'.")
@click.option("--edits", "edits", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="An 'editfast edit' output directory: evaluate before and after applying its edits.")
@click.option("--tasks", default="all", show_default=True, help="all, or a comma list: gsm8k,rte,nq,boolq,mutual,"
              "samsum,conll03,sst2,wikitext.")
@click.option("--protocol", type=click.Choice(["standard", "paper"]), default="standard", show_default=True)
@click.option("--limit", type=int, default=None, help="Examples per task (deterministic subsample by --seed).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", "batch_tokens", default="auto", show_default=True,
              help="Tokens per batch, or 'auto' (the largest that fits).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_cmd(model, edits, tasks, protocol, limit, seed, batch_tokens, out, dtype, device, quiet):
    """Measure general abilities (eight task categories + WikiText perplexity)."""
    from .api import load_journal
    from .eval.runner import evaluate, markdown_table, write_report
    from .eval.tasks import resolve_tasks
    from .models import load_model
    from .update import apply_update

    if limit is not None and limit <= 0:
        raise click.UsageError(f"--limit must be >= 1, got {limit}")
    if batch_tokens != "auto":
        try:
            batch_tokens = int(batch_tokens)
            assert batch_tokens > 0
        except (ValueError, AssertionError):
            raise click.UsageError(f"--batch-size must be 'auto' or a positive number, got {batch_tokens!r}")
    resolve_tasks(tasks)
    created = check_out_dir(out)
    try:
        lm = load_model(model, dtype=dtype, device=device)
        journal = load_journal(edits, lm)[1] if edits else None
        before = evaluate(lm, tasks, protocol, limit, seed, batch_tokens, progress=not quiet)
        after = None
        if journal is not None:
            for ups in journal:
                for u in ups:
                    apply_update(lm, u)
            after = evaluate(lm, tasks, protocol, limit, seed, batch_tokens, progress=not quiet)
        write_report(out, before, after)
    except BaseException:
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise
    click.echo(markdown_table(before, after))
    click.echo(f"results: {out / 'eval.json'}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    from .errors import EditfastError

    try:
        cli.main(args=argv, standalone_mode=False, prog_name="editfast")
    except click.exceptions.Abort:
        fail("aborted")
    except click.ClickException as e:
        fail(e.format_message().replace("\n", " "))
    except EditfastError as e:
        fail(str(e).replace("\n", " "))
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
