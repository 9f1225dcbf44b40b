"""Command line: ``editfast edit | eval | undo | study``.

Errors a user can cause print one line on stderr and exit with code 2; nothing is written
unless the whole job succeeded (files go to a temporary name and are renamed).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import contextmanager
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
    """Fast locate-then-edit knowledge editing and its side effects on general abilities."""


def method_names() -> list[str]:
    from .methods import METHODS

    return list(METHODS)


def method_help() -> str:
    from .methods import METHODS

    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())


def save_model_to(lm, out: Path) -> None:
    """The model's safetensors and tokenizer into OUT/model (a temporary folder, then renamed)."""
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


@contextmanager
def output_dir(out: Path):
    """Check ``out`` is writable before any work; remove it again if it was made here and stays empty."""
    created = check_out_dir(out)
    try:
        yield
    except BaseException:
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise


@cli.command("edit")
@click.option("--method", type=click.Choice(method_names(), case_sensitive=False), default="memit", show_default=True,
              help=method_help())
@click.option("--n", "n", type=int, default=10, show_default=True, help="Number of edits.")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Model: HF directory, .gguf file, 'smollm2-135m' or 'random:<preset>'.")
@click.option("--dataset", default=None,
              help="counterfact (500 full ROME records), counterfact-full (21,605 requests), zsre, zsre-alt "
                   "(zsRE toward each record's alt), or a JSON/JSONL file of requests. Default: counterfact, or "
                   "counterfact-full when --offset + --n exceeds 500.")
@click.option("--offset", type=int, default=0, show_default=True, help="Skip this many dataset records.")
@click.option("--batch-size", type=int, default=None,
              help="Edits per batch, applied one batch after another (default: the method's; MEMIT all at once, "
                   "ROME 1).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for session.json, journal/, results.json, curve.json (and the model with --save-model).")
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
              help="Also evaluate general abilities (all, or e.g. gsm8k,rte): before and after editing, or at "
                   "every --eval-at checkpoint.")
@click.option("--eval-limit", type=int, default=None, help="Examples per task for --eval.")
@click.option("--eval-at", "eval_at", default=None, metavar="K1,K2,...",
              help="Checkpoints in number of edits (batch boundaries, e.g. 0,10,20,50): evaluate there and write "
                   "OUT/curve.json and OUT/curve.png.")
@click.option("--protocol", type=click.Choice(["standard", "paper"]), default="standard", show_default=True,
              help="Evaluation protocol for --eval.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out (same options).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def edit_cmd(method, n, model, dataset, offset, batch_size, seed, out, save_model, hparams_file, sets, templates,
             dtype, device, no_eval, eval_tasks, eval_limit, eval_at, protocol, resume, quiet):
    """Apply N edits from a dataset in sequential batches; report efficacy, paraphrase and neighbourhood
    scores, and with --eval-at the curve of abilities against the number of edits."""
    from .data import load_dataset
    from .models import load_model
    from .session import EditSession

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
    pair = bool(eval_tasks) and eval_at is None
    if pair:
        eval_at = f"0,{n}"
    if eval_at is not None:
        from .methods import get_method
        from .session import parse_checkpoints

        parse_checkpoints(eval_at, n, get_method(method).batch_size(batch_size, n))  # before the model loads
    if resume and not (out / "session.json").is_file():
        raise click.UsageError(f"--resume: {str(out)!r} holds no editfast run to continue")
    with output_dir(out):
        lm = load_model(model, dtype=dtype, device=device)
        session = EditSession(lm, method, requests, hparams_file=hparams_file, overrides=overrides,
                              batch_size=batch_size, seed=seed, templates=templates, evaluate=not no_eval,
                              eval_tasks=eval_tasks, eval_limit=eval_limit, protocol=protocol, eval_at=eval_at,
                              out=out, progress=not quiet,
                              dataset={"name": str(dataset), "offset": offset, "n": n})
        result = session.run(resume=resume)
        before = after = None
        if pair:  # --eval without --eval-at: the checkpoints 0 and N as a before/after report
            from .eval.runner import EvalResult, write_report

            pts = result.curve["points"]
            before, after = (EvalResult.from_json({"model": lm.spec, "protocol": protocol, "seed": seed,
                                                   "limit": eval_limit, "seconds": 0.0, "engine": {},
                                                   "tasks": p["tasks"]}) for p in (pts[0], pts[-1]))
            write_report(out / "eval", before, after)
        if save_model:
            save_model_to(lm, out)
    click.echo(summary_table(result))
    if after is not None:
        from .eval.runner import markdown_table

        click.echo("\n" + markdown_table(before, after))
    if result.curve and not pair:
        click.echo("\n" + curve_table(result.curve))
        click.echo(f"curve: {out / 'curve.json'}")
    click.echo(f"results: {out / 'results.json'}")


def curve_table(curve: dict) -> str:
    """Checkpoints as rows: edits, the first edit metric, each task's headline metric, L1 drift."""
    pts = curve["points"]
    tasks = list(dict.fromkeys(t for p in pts for t in p.get("tasks", {})))
    from .session import headline_edit_metric

    em = next((h[0] for p in pts if (h := headline_edit_metric(p.get("edit_metrics")))), None)
    head = ["edits"] + ([em] if em else []) + [f"{t} {pts[0]['tasks'][t]['primary']}" if t in pts[0].get("tasks", {})
                                               else t for t in tasks] + ["L1 drift"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in pts:
        cells = [str(p["edits"])]
        if em:
            v = (p.get("edit_metrics") or {}).get(em)
            cells.append("-" if v is None else f"{v:.3f}")
        for t in tasks:
            r = p.get("tasks", {}).get(t)
            cells.append("-" if r is None else f"{r['metrics'][r['primary']]:.4f}")
        cells.append(f"{p['weights']['total']['l1']:.1f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


@cli.command("undo")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--to", "to", type=int, required=True, help="Number of edits to keep (a batch boundary of the run).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for the run cut after K edits (session.json, journal/).")
@click.option("--save-model", is_flag=True, help="Also write the model as it was after K edits into OUT/model.")
@click.option("--model", default=None, help="The run's model, if it was loaded from another path.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def undo_cmd(run, to, out, save_model, model, quiet):
    """The run's weights after K edits: the base model with the journal's batches 1..K replayed."""
    from .journal import write_entries
    from .models import load_model
    from .paths import write_json
    from .journal import load_run

    config, entries = load_run(run)
    ends = [0] + [e.end for e in entries]
    if to < 0 or to > ends[-1]:
        raise click.UsageError(f"--to {to} is outside the run, which has {ends[-1]} edits")
    if to not in ends:
        raise click.UsageError(f"--to {to} is not a batch boundary of the run (batches end at "
                               f"{', '.join(map(str, ends[1:]))})")
    if out.resolve() == run.resolve():
        raise click.UsageError("--out must differ from the run directory")
    with output_dir(out):
        keep = entries[: ends.index(to)]
        lm = None
        if save_model:
            from .update import apply_update

            lm = load_model(model or config["model"], dtype=config.get("dtype", "float32").replace("torch.", ""))
            if lm.fingerprint != config.get("model_fingerprint"):
                raise click.UsageError(f"model {lm.spec!r} is not the run's (fingerprint differs)")
            for e in keep:
                for u in e.updates:
                    apply_update(lm, u)
        write_entries(out, keep)
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        write_json(out / "session.json", {"config": {**cfg, "undone_from": str(run), "edits": to},
                                          "hparams": config.get("_hparams"), "templates": config.get("_templates")})
        if lm is not None:
            save_model_to(lm, out)
    click.echo(f"{len(keep)} batches ({to} edits) of {run} -> {out}")


@cli.command("study")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--profile", default=None, help="A profile of the study file (e.g. quick).")
@click.option("--resume", is_flag=True, help="Continue an interrupted study in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def study_cmd(config, out, profile, resume, quiet):
    """A grid of sequential editing sessions (methods x settings) on one model and dataset: ability
    against the number of edits, with study.json, report.md and one plot per task."""
    from .study import load_study, run_study

    study = load_study(config, profile)
    with output_dir(out):
        res = run_study(study, out, progress=not quiet, resume=resume)
    click.echo(res["report_md"])
    click.echo(f"study: {out / 'study.json'}")


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
    with output_dir(out):
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
