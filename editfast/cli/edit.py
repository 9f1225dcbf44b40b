"""``editfast edit``: N edits from a dataset applied in sequential batches, journaled into --out
(resumable), with the edit metrics, and optionally the abilities before and after or at checkpoints
(the curve); --rect/--norm-anchor post-process a locate-then-edit update, --mend names MEND's network."""

from __future__ import annotations

from pathlib import Path

import click

from editfast.cli.exits import note_on_failure
from editfast.cli.options import (
    device_option,
    dtype_option,
    file_options,
    force_option,
    hparams_option,
    max_memory_option,
    method_option,
    model_option,
    out_option,
    quiet_option,
    seed_option,
    sets_option,
)
from editfast.cli.shared import join_ranks, preflight, save_model_to
from editfast.core.distributed import agree, launched, rank_out
from editfast.core.errors import EditfastError
from editfast.data.requests import dataset_schema, default_dataset, load_dataset
from editfast.eval.edit_metrics import headline_edit_metric
from editfast.eval.generation import CONSISTENCY_MISSING, check_generation_prompts
from editfast.eval.runner import EvalResult, markdown_table, write_report
from editfast.eval.tasks import resolve_tasks
from editfast.methods.hparams import parse_overrides
from editfast.methods.locate_then_edit.stats import stats_location
from editfast.methods.mend.net import read_meta
from editfast.methods.registry import METHODS, get_method
from editfast.models.load import load_model
from editfast.session.export import model_card
from editfast.session.journal import Journal
from editfast.session.outputs import OutputDir, new_run_dir
from editfast.session.session import EditSession, parse_checkpoints


def post_processes(method: str, rect: float | None, norm_anchor: bool) -> dict:
    """--rect / --norm-anchor as hyper-parameters; refused for a method that is not locate-then-edit."""
    asked = {k: v for k, v in (("rect", rect), ("norm_anchor", norm_anchor or None)) if v is not None}
    if asked and not get_method(method).locate_then_edit:
        which = ", ".join(m.name for m in METHODS.values() if m.locate_then_edit)
        flag = "--rect" if "rect" in asked else "--norm-anchor"
        raise click.UsageError(f"{flag} post-processes a locate-then-edit method's update ({which}); "
                               f"{method} is not one")
    return asked


def trained_network(method: str, mend_dir: Path | None) -> dict:
    """--mend DIR as the hyper-parameter mend_dir; refused for a method without a trained network."""
    if mend_dir is None:
        return {}
    if not get_method(method).trained_network:
        which = ", ".join(m.name for m in METHODS.values() if m.trained_network)
        raise click.UsageError(f"--mend gives the trained editor network of {which}; {method} has none")
    return {"mend_dir": str(mend_dir)}


def check_trained_network(hp) -> None:
    """A trained network named by the hyper-parameters (--mend or --set mend_dir=) must exist and be
    readable before the model loads (its model and shapes are checked once the model is loaded)."""
    if getattr(hp, "mend_dir", None) is not None:
        read_meta(hp.mend_dir)


def summary_table(result) -> str:
    """The edit metrics before and after, and the timings (and statistics) of the run."""
    s = result.summary
    rows = []
    if s["metric_kind"] == "counterfact":
        names = [("efficacy", "efficacy_success"), ("efficacy magnitude", "efficacy_magnitude"),
                 ("paraphrase", "paraphrase_success"), ("neighbourhood", "neighborhood_success")]
        if "fluency" in s.get("post", {}):  # the papers' columns: efficacy, generalization, specificity, fluency
            names.append(("fluency", "fluency"))
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
    if t.get("statistics"):  # the texts and tokens the statistics really used (the deepest layer's)
        st = list(t["statistics"].values())[-1]
        rows.append(f"statistics: {st['corpus']} · {st['n_samples']:,} texts (asked {st['n_samples_requested']:,}) "
                    f"· {st['tokens']:,} tokens{' · cached' if st['cached'] else ''}")
    return "\n".join(rows)


def curve_table(curve: dict) -> str:
    """Checkpoints as rows: edits, the first edit metric, each task's headline metric, L1 drift."""
    pts = curve["points"]
    tasks = list(dict.fromkeys(t for p in pts for t in p.get("tasks", {})))
    em = next((h[0] for p in pts if (h := headline_edit_metric(p.get("edit_metrics")))), None)
    flu = any("generation" in p for p in pts)
    head = ["edits"] + ([em] if em else []) + (["fluency"] if flu else []) + \
        [f"{t} {pts[0]['tasks'][t]['primary']}" if t in pts[0].get("tasks", {}) else t for t in tasks] + ["L1 drift"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in pts:
        cells = [str(p["edits"])]
        if em:
            v = (p.get("edit_metrics") or {}).get(em)
            cells.append("-" if v is None else f"{v:.3f}")
        if flu:
            g = p.get("generation")
            cells.append("-" if g is None else f"{g['fluency']:.3f}")
        for t in tasks:
            r = p.get("tasks", {}).get(t)
            cells.append("-" if r is None else f"{r['metrics'][r['primary']]:.4f}")
        cells.append(f"{p['weights']['total']['l1']:.1f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


@click.command("edit")
@method_option()
@click.option("--n", "n", type=int, default=10, show_default=True, help="Number of edits.")
@model_option
@click.option("--dataset", default=None,
              help="Default: counterfact while --offset + --n <= 500, else counterfact-full (the run's first line "
                   "and results.json say which). counterfact (500 records, full ROME schema: 2 paraphrases, 10 neighbours each), counterfact-full "
                   "(21,605 requests, EasyEdit schema: 1 paraphrase, 1 neighbour each), zsre (toward answers[0], as "
                   "MEMIT), zsre-alt (zsRE toward each record's alt), or a JSON/JSONL file of requests (zsRE "
                   "records toward their alt, as EasyEdit).")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="Skip this many dataset records.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Edits per batch, applied one batch after another (default: the method's; MEMIT all at once, "
                   "ROME 1).")
@seed_option
@out_option("Directory for session.json, journal/, results.json, curve.json (and the model with --save-model); "
            "default: a new runs/METHOD-N[-K] below the current directory.", required=False)
@click.option("--save-model", is_flag=True, help="Also write the edited model as safetensors into OUT/model.")
@hparams_option("YAML/JSON file of hyper-parameters (original ROME/MEMIT keys) over the model's preset.")
@sets_option()
@click.option("--rect", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="FRACTION",
              help="RECT: keep this fraction of each update's entries (largest relative change |ΔW/W|), zero the rest "
                   "(locate-then-edit methods).")
@click.option("--norm-anchor", is_flag=True, help="Hold every edited matrix's norm to its value before the first edit "
                                                  "(locate-then-edit methods).")
@click.option("--mend", "mend_dir", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="MEND: the editor network trained by 'editfast train-mend --out DIR' (hparam mend_dir).")
@click.option("--templates", type=click.Choice(["generated", "fixed"]), default="generated", show_default=True,
              help="Context templates: sampled from the model with --seed, or a fixed set.")
@dtype_option
@device_option
@max_memory_option
@click.option("--no-eval", is_flag=True, help="Skip the edit metrics.")
@click.option("--eval", "eval_tasks", default=None, metavar="TASKS",
              help="Also evaluate general abilities (all, or e.g. gsm8k,rte): before and after editing, or at "
                   "every --eval-at checkpoint.")
@click.option("--eval-limit", type=click.IntRange(1), default=None, help="Examples per task for --eval.")
@click.option("--eval-at", "eval_at", default=None, metavar="K1,K2,...",
              help="Checkpoints in number of edits (batch boundaries, e.g. 0,10,20,50): evaluate there and write "
                   "OUT/curve.json and OUT/curve.png.")
@click.option("--protocol", type=click.Choice(["standard", "paper"]), default="standard", show_default=True,
              help="Evaluation protocol for --eval.")
@click.option("--fluency", is_flag=True,
              help="Also measure CounterFact's fluency (ROME's n-gram entropy of top-k samples of the generation "
                   "prompts): per edited fact before and after, and at every --eval-at checkpoint on a fixed probe "
                   "set (the generation prompts of the first 10 full-schema records).")
@click.option("--consistency", is_flag=True,
              help="CounterFact's consistency: not available (ROME's attribute snippets and IDF table cannot be had "
                   "here); refused.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out (same options).")
@force_option
@quiet_option
def edit_cmd(method, n, model, dataset, offset, batch_size, seed, out, save_model, hparams_file, sets, rect,
             norm_anchor, mend_dir, templates, dtype, device, max_memory, no_eval, eval_tasks, eval_limit, eval_at,
             protocol, fluency, consistency, resume, force, quiet):
    """Apply N edits from a dataset in sequential batches; report efficacy, paraphrase and neighbourhood
    scores, and with --eval-at the curve of abilities against the number of edits."""
    if n < 1:
        raise click.UsageError(f"--n must be >= 1, got {n}")
    params = dict(method=method, model=model, dtype=dtype, device=device)
    file_opts = file_options(hparams_file, params)  # EasyEdit's alg_name, model_name, fp16, device
    method, model, dtype, device = params["method"], params["model"], params["dtype"], params["device"]
    if resume and force:
        raise click.UsageError("--resume and --force exclude each other")
    if out is None and resume:
        raise click.UsageError("--resume needs --out, the run to continue")
    if dataset is None:
        dataset = default_dataset(n, offset)
    overrides = parse_overrides(sets)
    overrides.update(post_processes(method, rect, norm_anchor))
    overrides.update(trained_network(method, mend_dir))
    if consistency:
        raise EditfastError(CONSISTENCY_MISSING)
    requests = load_dataset(dataset, n, offset=offset)
    if fluency:
        check_generation_prompts(requests, str(dataset))  # before the model loads
    if eval_tasks:
        resolve_tasks(eval_tasks)  # unknown task names fail before any work
    pair = bool(eval_tasks) and eval_at is None
    if pair:
        eval_at = f"0,{n}"
    if fluency and no_eval and eval_at is None:
        raise click.UsageError("--fluency with --no-eval measures nothing: fluency per fact is part of the edit "
                               "metrics; give --eval-at for fluency at checkpoints")
    if eval_at is not None:
        parse_checkpoints(eval_at, n, get_method(method).batch_size(batch_size, n))  # before the model loads
    if resume and not (out / "session.json").is_file():
        raise click.UsageError(f"--resume: {str(out)!r} holds no editfast run to continue")
    with stats_location(file_opts.get("stats_dir")):  # the corpus check may find imported statistics there
        hp = preflight(model, method, hparams_file, overrides, dtype=dtype)
    check_trained_network(hp)
    if out is None and launched():
        raise click.UsageError("under torchrun, name the run folder with --out (every rank writes to the same one)")
    out = out or new_run_dir(Path("runs"), f"{method}-{n}")
    device, quiet = join_ranks(device, quiet, {"hparams": hp.to_dict()})
    click.echo(f"editfast: {method}, {n} edits of {dataset} from {offset} ({dataset_schema(dataset)}); run folder {out}")
    with stats_location(file_opts.get("stats_dir")), rank_out(out, resume) as out, \
            OutputDir(out, resume=resume, force=force, keep=lambda d: Journal(d).exists()) as od:
        lm = load_model(model, dtype=dtype, device=device, max_memory=max_memory)
        agree({"model_fingerprint": lm.fingerprint})
        session = EditSession(lm, method, requests, hparams=hp, batch_size=batch_size, seed=seed, templates=templates,
                              evaluate=not no_eval, eval_tasks=eval_tasks, eval_limit=eval_limit, protocol=protocol,
                              eval_at=eval_at, out=out, progress=not quiet, fluency=fluency,
                              dataset={"name": str(dataset), "offset": offset, "n": n,
                                       "schema": dataset_schema(dataset)})
        od.start()
        with note_on_failure(lambda: f"{out} keeps the journal of {session.edits_done} edits: continue with --resume"
                             if session.entries else None):  # also while the report and the model are written
            result = session.run(resume=resume)
            before = after = None
            if pair:  # --eval without --eval-at: the checkpoints 0 and N as a before/after report
                pts = result.curve["points"]
                before, after = (EvalResult.from_json({"model": lm.spec, "protocol": protocol, "seed": seed,
                                                       "limit": eval_limit, "seconds": 0.0, "engine": {},
                                                       "tasks": p["tasks"]}) for p in (pts[0], pts[-1]))
                write_report(out / "eval", before, after, lm.device)
            if save_model:
                save_model_to(lm, out, model_card(session.config, session.hp.to_dict(), result.per_request))
    click.echo(summary_table(result))
    if after is not None:
        click.echo("\n" + markdown_table(before, after))
    if result.curve and not pair:
        click.echo("\n" + curve_table(result.curve))
        click.echo(f"curve: {out / 'curve.json'}")
    click.echo(f"results: {out / 'results.json'}")
