"""Command line: ``editfast edit | eval | undo | export | study | train-mend``.

Errors a user can cause print one line on stderr and exit with code 2 (an interruption: 130 for
SIGINT, 143 for SIGTERM). Options, hyper-parameters and data are checked before the model loads.
Output directories are transactions (``outputs.OutputDir``): one writer at a time, a non-empty
--out only with --resume or --force, and a failed or interrupted run leaves either nothing or,
for an edit run, its complete journal batches to resume.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import click

from editfast.core.errors import (
    EditfastError,
    Terminated,
    on_sigint,
    on_sigterm,
    raise_if_terminated,
    reset_terminated,
    unraisable_hook,
)
from editfast.core.threads import choose_wait_policy

choose_wait_policy()  # before torch loads (the options below import it): see load.py

SEEDS = click.IntRange(0, 2**32 - 1)  # what every random generator editfast seeds accepts
NOTES: list[str] = []  # said after an error or interruption (e.g. how to resume)
ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def fail(message: str, code: int = 2) -> None:
    click.echo(f"editfast: {'error: ' if code == 2 else ''}{message}", err=True)
    sys.exit(code)


def quiet_libraries() -> None:
    """--quiet: no progress bars, info logs or warnings from transformers and friends either."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=RuntimeWarning, module=r"editfast\.")  # ours: a cache rebuilt ...
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def out_option(help: str):
    def check(ctx, param, value):
        if value is not None and not str(value).strip():
            raise click.BadParameter("must name a directory, got an empty path")
        return Path(value).expanduser() if value is not None else None

    return click.option("--out", "out", type=click.Path(file_okay=False), callback=check, required=True, help=help)


class DeviceType(click.ParamType):
    """--device: cpu, cuda, cuda:N, mps or auto (checked here, so a typo never waits for the model)."""

    name = "device"
    CHOICES = "cpu|cuda|cuda:N|mps|auto"

    def get_metavar(self, param, ctx=None) -> str:
        return f"[{self.CHOICES}]"

    def convert(self, value, param, ctx):
        import re

        text = str(value).strip().lower()
        if not re.fullmatch(r"cpu|mps|auto|cuda(:\d+)?", text):
            self.fail(f"{value!r} is not a device; choose from {self.CHOICES.replace('|', ', ')}", param, ctx)
        return text


# One option, one meaning and one unit wherever it appears.
DTYPES = click.Choice(["float32", "bfloat16", "float16"])
dtype_option = click.option("--dtype", type=DTYPES, default="float32",
                            show_default=True, help="Weights' dtype.")
device_option = click.option("--device", type=DeviceType(), default="cpu", show_default=True,
                             help="Where the model runs; auto: its layers over the GPUs, then the CPU, then disk "
                                  "(accelerate's device_map='auto'; under torchrun, each rank its share of the GPUs).")


force_option = click.option("--force", is_flag=True, help="Replace what --out holds (only once every check passed).")


def _max_memory(ctx, param, value):
    from editfast.models.placement import parse_max_memory

    try:
        return parse_max_memory(value)
    except EditfastError as e:
        raise click.BadParameter(str(e).removeprefix("--max-memory ")) from None


max_memory_option = click.option("--max-memory", "max_memory", default=None, callback=_max_memory,
                                 metavar="DEV=SIZE,...",
                                 help="With --device auto: the most memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB.")


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
    if t.get("statistics"):  # the texts and tokens the statistics really used (the deepest layer's)
        st = list(t["statistics"].values())[-1]
        rows.append(f"statistics: {st['corpus']} · {st['n_samples']:,} texts (asked {st['n_samples_requested']:,}) "
                    f"· {st['tokens']:,} tokens{' · cached' if st['cached'] else ''}")
    return "\n".join(rows)


TORCHRUN_COMMANDS = ("edit", "eval")  # data-parallel under torchrun (statistics, evaluation)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="editfast")
@click.pass_context
def cli(ctx) -> None:
    """Fast locate-then-edit knowledge editing and its side effects on general abilities."""
    from editfast.core.distributed import launched

    if launched() and ctx.invoked_subcommand not in TORCHRUN_COMMANDS:
        raise click.UsageError(f"torchrun runs {' and '.join(TORCHRUN_COMMANDS)} data-parallel; "
                               f"run {ctx.invoked_subcommand} as one process")


def join_ranks(device: str, quiet: bool, resolved: dict) -> tuple[str, bool]:
    """Under torchrun: join the process group, check that every rank resolved the same options and
    ``resolved`` configuration (else one line, exit 2), and return this rank's device (cuda:LOCAL_RANK)
    and whether it is quiet (ranks other than 0 show nothing on stdout). Otherwise the identity."""
    from editfast.core import distributed as dist

    if not dist.init(device):
        return device, quiet
    params = dict(click.get_current_context().params)
    dist.agree({"command": click.get_current_context().info_name, "options": params, **resolved})
    if not dist.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of this rank's life)
        quiet = True
    return dist.local_device(device), quiet


def method_names(locate_then_edit: bool = False) -> list[str]:
    from editfast.methods.registry import METHODS

    return [n for n, m in METHODS.items() if m.locate_then_edit or not locate_then_edit]


def method_help() -> str:
    from editfast.methods.registry import METHODS

    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())


def save_model_to(lm, out: Path, card: str | None = None) -> None:
    """The model's safetensors and tokenizer, and its model card ``card`` as README.md, into OUT/model
    (a hidden folder, then renamed; the permissions a plain mkdir/open gives, not mkdtemp's 0700)."""
    from editfast.core.paths import normal_permissions

    target = out / "model"
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=out))
    try:
        lm.model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        normal_permissions(tmp, recursive=True)
        raise_if_terminated()  # SIGTERM/SIGINT during the save may have been swallowed (a __del__ ran it)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def post_processes(method: str, rect: float | None, norm_anchor: bool) -> dict:
    """--rect / --norm-anchor as hyper-parameters; refused for a method that is not locate-then-edit."""
    from editfast.methods.registry import METHODS, get_method

    asked = {k: v for k, v in (("rect", rect), ("norm_anchor", norm_anchor or None)) if v is not None}
    if asked and not get_method(method).locate_then_edit:
        which = ", ".join(m.name for m in METHODS.values() if m.locate_then_edit)
        flag = "--rect" if "rect" in asked else "--norm-anchor"
        raise click.UsageError(f"{flag} post-processes a locate-then-edit method's update ({which}); "
                               f"{method} is not one")
    return asked


def preflight(model: str, method: str, hparams_file, overrides: dict, options: dict | None = None,
              dtype: str = "float32"):
    """The hyper-parameters, resolved and checked against the model's config before its weights load
    (the corpus too, when the method needs statistics: ``stats.check_corpus``). ``options`` receives
    the hparams file's bookkeeping keys (``hparams.split_options``)."""
    from editfast.methods.hparams import check_layers
    from editfast.methods.locate_then_edit.stats import check_corpus
    from editfast.methods.registry import get_method, resolve_hparams
    from editfast.models.archs import adapter_for
    from editfast.models.load import model_config

    config = model_config(model)
    adapter = adapter_for(config)
    hp = resolve_hparams(method, model, config, overrides, hparams_file, options={} if options is None else options)
    hp.check_modules(adapter)
    check_layers(hp, int(getattr(config, adapter.n_layers_attr)))
    if getattr(hp, "mom2_dataset", None) is not None and get_method(method).needs_statistics(hp):
        check_corpus(hp, dtype)
    return hp


def file_options(hparams_file, params: dict) -> dict:
    """An EasyEdit/original hparams file's bookkeeping keys (``hparams.split_options``) as the values of
    the options the user left at their defaults: method (alg_name), model (model_name), dtype (fp16),
    device (device; cuda:N falls back to cpu, with a warning, where no GPU is; model_parallel: true ->
    auto). Returns the options."""
    import warnings

    from editfast.methods.hparams import read_hparams_file
    from editfast.methods.registry import split_options

    if hparams_file is None:
        return {}
    opts = split_options(read_hparams_file(hparams_file))[1]
    ctx = click.get_current_context()
    given = lambda name: ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)
    for name, key in (("method", "method"), ("model", "model"), ("dtype", "dtype"), ("device", "device")):
        if key in opts and name in params and not given(name):
            params[name] = opts[key]
    if opts.get("device_map") == "auto" and "device" in params and not given("device"):
        params["device"] = "auto"  # model_parallel: true -> the layers spread over the devices
    elif "device" in opts and not given("device") and str(params.get("device", "")).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            warnings.warn(f"{hparams_file}: device {opts['device']} but no CUDA device here; using cpu", UserWarning)
            params["device"] = "cpu"
    return opts


@cli.command("edit")
@click.option("--method", type=click.Choice(method_names(), case_sensitive=False), default="memit", show_default=True,
              help=method_help())
@click.option("--n", "n", type=int, default=10, show_default=True, help="Number of edits.")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Model: HF directory, .gguf file, 'smollm2-135m' or 'random:<preset>'.")
@click.option("--dataset", default="counterfact", show_default=True,
              help="counterfact (500 records, full ROME schema: 2 paraphrases, 10 neighbours each), counterfact-full "
                   "(21,605 requests, EasyEdit schema: 1 paraphrase, 1 neighbour each), zsre (toward answers[0], as "
                   "MEMIT), zsre-alt (zsRE toward each record's alt), or a JSON/JSONL file of requests (zsRE "
                   "records toward their alt, as EasyEdit).")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True, help="Skip this many dataset records.")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Edits per batch, applied one batch after another (default: the method's; MEMIT all at once, "
                   "ROME 1).")
@click.option("--seed", type=SEEDS, default=0, show_default=True)
@out_option("Directory for session.json, journal/, results.json, curve.json (and the model with --save-model).")
@click.option("--save-model", is_flag=True, help="Also write the edited model as safetensors into OUT/model.")
@click.option("--hparams", "hparams_file", type=click.Path(path_type=Path), default=None,
              help="YAML/JSON file of hyper-parameters (original ROME/MEMIT keys) over the model's preset.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one hyper-parameter (repeatable).")
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
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out (same options).")
@force_option
@click.option("--quiet", is_flag=True, help="No progress bars, logs or warnings.")
def edit_cmd(method, n, model, dataset, offset, batch_size, seed, out, save_model, hparams_file, sets, rect,
             norm_anchor, mend_dir, templates, dtype, device, max_memory, no_eval, eval_tasks, eval_limit, eval_at,
             protocol, resume, force, quiet):
    """Apply N edits from a dataset in sequential batches; report efficacy, paraphrase and neighbourhood
    scores, and with --eval-at the curve of abilities against the number of edits."""
    from editfast.core.distributed import agree, rank_out
    from editfast.data.requests import load_dataset
    from editfast.methods.hparams import parse_overrides
    from editfast.models.load import load_model
    from editfast.session.journal import Journal
    from editfast.session.outputs import OutputDir
    from editfast.session.session import EditSession

    if n < 1:
        raise click.UsageError(f"--n must be >= 1, got {n}")
    params = dict(method=method, model=model, dtype=dtype, device=device)
    file_opts = file_options(hparams_file, params)  # EasyEdit's alg_name, model_name, fp16, device
    method, model, dtype, device = params["method"], params["model"], params["dtype"], params["device"]
    if resume and force:
        raise click.UsageError("--resume and --force exclude each other")
    overrides = parse_overrides(sets)
    overrides.update(post_processes(method, rect, norm_anchor))
    overrides.update(trained_network(method, mend_dir))
    requests = load_dataset(dataset, n, offset=offset)
    if eval_tasks:
        from editfast.eval.tasks import resolve_tasks

        resolve_tasks(eval_tasks)  # unknown task names fail before any work
    pair = bool(eval_tasks) and eval_at is None
    if pair:
        eval_at = f"0,{n}"
    if eval_at is not None:
        from editfast.methods.registry import get_method
        from editfast.session.session import parse_checkpoints

        parse_checkpoints(eval_at, n, get_method(method).batch_size(batch_size, n))  # before the model loads
    if resume and not (out / "session.json").is_file():
        raise click.UsageError(f"--resume: {str(out)!r} holds no editfast run to continue")
    from editfast.methods.locate_then_edit.stats import stats_location

    with stats_location(file_opts.get("stats_dir")):  # the corpus check may find imported statistics there
        hp = preflight(model, method, hparams_file, overrides, dtype=dtype)
    check_trained_network(hp)
    device, quiet = join_ranks(device, quiet, {"hparams": hp.to_dict()})
    with stats_location(file_opts.get("stats_dir")), rank_out(out, resume) as out, \
            OutputDir(out, resume=resume, force=force, keep=lambda d: Journal(d).exists()) as od:
        lm = load_model(model, dtype=dtype, device=device, max_memory=max_memory)
        agree({"model_fingerprint": lm.fingerprint})
        session = EditSession(lm, method, requests, hparams=hp, batch_size=batch_size, seed=seed, templates=templates,
                              evaluate=not no_eval, eval_tasks=eval_tasks, eval_limit=eval_limit, protocol=protocol,
                              eval_at=eval_at, out=out, progress=not quiet,
                              dataset={"name": str(dataset), "offset": offset, "n": n})
        od.start()
        try:
            result = session.run(resume=resume)
        except BaseException:
            if session.entries:
                NOTES.append(f"{out} keeps the journal of {session.edits_done} edits: continue with --resume")
            raise
        before = after = None
        if pair:  # --eval without --eval-at: the checkpoints 0 and N as a before/after report
            from editfast.eval.runner import EvalResult, write_report

            pts = result.curve["points"]
            before, after = (EvalResult.from_json({"model": lm.spec, "protocol": protocol, "seed": seed,
                                                   "limit": eval_limit, "seconds": 0.0, "engine": {},
                                                   "tasks": p["tasks"]}) for p in (pts[0], pts[-1]))
            write_report(out / "eval", before, after, lm.device)
        if save_model:
            from editfast.session.export import model_card

            save_model_to(lm, out, model_card(session.config, session.hp.to_dict(), result.per_request))
    click.echo(summary_table(result))
    if after is not None:
        from editfast.eval.runner import markdown_table

        click.echo("\n" + markdown_table(before, after))
    if result.curve and not pair:
        click.echo("\n" + curve_table(result.curve))
        click.echo(f"curve: {out / 'curve.json'}")
    click.echo(f"results: {out / 'results.json'}")


def curve_table(curve: dict) -> str:
    """Checkpoints as rows: edits, the first edit metric, each task's headline metric, L1 drift."""
    pts = curve["points"]
    tasks = list(dict.fromkeys(t for p in pts for t in p.get("tasks", {})))
    from editfast.eval.edit_metrics import headline_edit_metric

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


# ---------------------------------------------------------------------------------------------- MEND
# Methods with a trained editor network (MEND: hparam ``mend_dir``), and ``train-mend`` that trains one.


def trained_network(method: str, mend_dir: Path | None) -> dict:
    """--mend DIR as the hyper-parameter mend_dir; refused for a method without a trained network."""
    from editfast.methods.registry import METHODS, get_method

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
        from editfast.methods.mend.net import read_meta

        read_meta(hp.mend_dir)


@cli.command("train-mend")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Model: HF directory, .gguf file, 'smollm2-135m' or 'random:<preset>'.")
@click.option("--data", default="counterfact-train", show_default=True,
              help="Training requests: counterfact-train (EasyEdit's train split without the 500 'counterfact' "
                   "evaluation records), another dataset name, or a JSON/JSONL file of requests.")
@out_option("Directory for mend.safetensors (the network) and mend.json (its description, held-out success).")
@click.option("--steps", type=click.IntRange(1), default=1000, show_default=True,
              help="Training iterations (one batch of train_batch_size edits each).")
@click.option("--seed", type=SEEDS, default=0, show_default=True)
@click.option("--heldout", type=click.IntRange(0), default=50, show_default=True,
              help="The last HELDOUT requests of --data are not trained on: each is edited alone with the trained "
                   "network to measure efficacy, paraphrase and neighbourhood success.")
@click.option("--hparams", "hparams_file", type=click.Path(path_type=Path), default=None,
              help="YAML/JSON file of MEND hyper-parameters over the model's preset.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one hyper-parameter (repeatable).")
@device_option
@force_option
@click.option("--quiet", is_flag=True, help="No progress bars, logs or warnings.")
def train_mend_cmd(model, data, out, steps, seed, heldout, hparams_file, sets, device, force, quiet):
    """Train MEND's editor network for a model (Mitchell et al., 2022) and save it for
    'editfast edit --method mend --mend OUT'."""
    from editfast.cli.train_mend import train_and_save
    from editfast.data.requests import load_dataset
    from editfast.methods.hparams import parse_overrides
    from editfast.models.load import load_model
    from editfast.session.outputs import OutputDir

    overrides = parse_overrides(sets)
    if "mend_dir" in overrides:
        raise click.UsageError("mend_dir names a trained network to edit with; train-mend writes its network to --out")
    hp = preflight(model, "mend", hparams_file, overrides)
    requests = load_dataset(data)
    if len(requests) - heldout < hp.train_batch_size:
        raise click.UsageError(f"--data {data} has {len(requests)} requests: with --heldout {heldout}, fewer than the "
                               f"{hp.train_batch_size} a training step needs are left to train on")
    train, held = requests[: len(requests) - heldout], requests[len(requests) - heldout:]
    with OutputDir(out, staged=True, force=force) as od:
        lm = load_model(model, device=device)
        info = {"name": str(data), "n_train": len(train), "heldout": heldout,
                "heldout_case_ids": [r.case_id for r in held]}
        meta = train_and_save(lm, train, held, hp, steps, seed, od.path, info, progress=not quiet)
    t, h = meta["training"], meta["heldout"]
    click.echo(f"trained {steps} steps ({t['optimizer_steps']} optimiser steps) in {t['seconds']:.0f}s "
               f"({t['steps_per_s']:.2f} steps/s) on {len(train)} requests")
    if h.get("n"):
        keys = [k for k in ("efficacy_success", "paraphrase_success", "neighborhood_success", "rewrite_acc",
                            "paraphrase_acc", "neighborhood_acc") if h["post"].get(k) is not None]
        fmt = lambda x: "-" if x is None else f"{x:.3f}"
        click.echo(f"held-out edits ({h['n']}, each alone): " + ", ".join(
            f"{k.replace('_success', '')} {fmt(h['pre'].get(k))} -> {fmt(h['post'][k])}" for k in keys))
    click.echo(f"network: {out / 'mend.safetensors'}")


@cli.command("undo")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--to", "to", type=click.IntRange(0), required=True,
              help="Number of edits to keep (a batch boundary of the run).")
@out_option("Directory for the run cut after K edits (session.json, journal/).")
@click.option("--save-model", is_flag=True, help="Also write the model as it was after K edits into OUT/model.")
@click.option("--model", default=None, help="The run's model, if it was loaded from another path.")
@force_option
@click.option("--quiet", is_flag=True, help="No progress bars, logs or warnings.")
def undo_cmd(run, to, out, save_model, model, force, quiet):
    """The run's weights after K edits: the base model with the journal's batches 1..K replayed
    (exact: the same weights the run had after K edits)."""
    from editfast.core.paths import write_json
    from editfast.models.load import load_model
    from editfast.session.journal import load_run, write_entries
    from editfast.session.outputs import OutputDir

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
            from editfast.models.update import apply_update

            lm = load_model(model or config["model"], dtype=config.get("dtype", "float32").replace("torch.", ""))
            config, entries = load_run(run, lm)  # names, shapes and the model's fingerprint checked
            for e in keep:
                for u in e.updates:
                    apply_update(lm, u)
        write_entries(od.path, keep)
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        write_json(od.path / "session.json", {"config": {**cfg, "undone_from": str(run), "edits": to},
                                              "hparams": config.get("_hparams"), "templates": config.get("_templates")})
        if lm is not None:
            from editfast.session.export import model_card, run_edits

            save_model_to(lm, od.path, model_card(config, config.get("_hparams"), run_edits(run, config, to)))
    click.echo(f"{len(keep)} batches ({to} edits) of {run} -> {out}")


@cli.command("export")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.option("--lora", "lora", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for a PEFT LoRA adapter of the run's edits (adapter_config.json, "
                   "adapter_model.safetensors, README.md).")
@click.option("--model", default=None, help="The run's base model, if it was loaded from another path.")
@click.option("--to", "to", type=int, default=None, help="Export the first K edits (a batch boundary; default all).")
@click.option("--dtype", type=DTYPES, default="float32", show_default=True,
              help="dtype of the adapter's tensors.")
@click.option("--force", is_flag=True, help="Replace what --lora holds (only once every check passed).")
@click.option("--quiet", is_flag=True, help="No progress bars, logs or warnings.")
def export_cmd(run, lora, model, to, dtype, force, quiet):
    """A PEFT LoRA adapter of the run's edits: loaded with peft on the base model it is the edited
    model (servable by vLLM's multi-LoRA where the rank is at most 512)."""
    import warnings

    from editfast.session.export import lora_from_run

    if not str(lora).strip():
        raise click.UsageError("--lora must name a directory, got an empty path")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the summary's warnings are said below, once
        s = lora_from_run(run, lora, model=model, to=to, dtype=dtype, force=force)
    for w in s["warnings"]:
        click.echo(f"editfast: warning: {w}", err=True)
    click.echo(f"{s['edits']} edits ({s['batches']} batches, {s['method']}) of {run} -> {lora}: LoRA rank {s['r']} "
               f"on {len(s['target_modules'])} module(s) ({', '.join(s['target_modules'])})")


@cli.command("study")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@out_option("Directory for study.json, report.md, plots/ and one run per session in runs/.")
@click.option("--profile", default=None, help="A profile of the study file (e.g. quick).")
@click.option("--resume", is_flag=True, help="Continue an interrupted study in --out.")
@force_option
@click.option("--quiet", is_flag=True, help="No progress bars, logs or warnings.")
def study_cmd(config, out, profile, resume, force, quiet):
    """A grid of sequential editing sessions (methods x settings) on one model and dataset: ability
    against the number of edits, with study.json, report.md and one plot per task."""
    from editfast.session.journal import Journal
    from editfast.session.outputs import OutputDir
    from editfast.session.study import load_study, run_study

    if resume and force:
        raise click.UsageError("--resume and --force exclude each other")
    study = load_study(config, profile)
    has_runs = lambda d: any(Journal(r).exists() for r in (d / "runs").glob("*"))
    with OutputDir(out, resume=resume, force=force, keep=has_runs) as od:
        od.start()
        try:
            res = run_study(study, out, progress=not quiet, resume=resume)
        except BaseException:
            if has_runs(out):
                NOTES.append(f"{out} keeps the finished batches of its sessions: continue with --resume")
            raise
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
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Examples per task (deterministic subsample by --seed).")
@click.option("--seed", type=SEEDS, default=0, show_default=True)
@click.option("--batch-tokens", "batch_tokens", default="auto", show_default=True,
              help="Tokens per forward batch, or 'auto' (the largest that fits).")
@out_option("Directory for eval.json, report.md, tasks/ (and change.png with --edits).")
@dtype_option
@device_option
@max_memory_option
@click.option("--log-samples", is_flag=True, help="Also write every example's prompt, target, responses and "
              "metrics as lm-evaluation-harness does: samples_<task>_<date>.jsonl (with --edits in before/, after/).")
@click.option("--engine", type=click.Choice(["editfast", "vllm"]), default="editfast", show_default=True,
              help="vllm: not available yet (see the README's Scale-out section).")
@force_option
@click.option("--quiet", is_flag=True, help="No progress bars, logs or warnings.")
def eval_cmd(model, edits, tasks, protocol, limit, seed, batch_tokens, out, dtype, device, max_memory,
             log_samples, engine, force, quiet):
    """Measure general abilities (eight task categories + WikiText perplexity)."""
    from editfast.api import load_journal
    from editfast.core.distributed import agree, rank_out
    from editfast.eval.runner import evaluate, markdown_table, write_report
    from editfast.eval.tasks import resolve_tasks
    from editfast.models.load import load_model
    from editfast.models.update import apply_update
    from editfast.session.outputs import OutputDir

    if batch_tokens != "auto":
        try:
            batch_tokens = int(batch_tokens)
            assert batch_tokens > 0
        except (ValueError, AssertionError):
            raise click.UsageError(f"--batch-tokens must be 'auto' or a positive number, got {batch_tokens!r}")
    if engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise click.UsageError("--engine vllm needs vLLM, which is not installed (pip install vllm, on a CUDA "
                                   "machine); the default engine runs everywhere")
        raise click.UsageError("--engine vllm is not implemented in this version: evaluate with the default engine "
                               "(under torchrun for several GPUs), or serve the base model with vLLM and the adapter "
                               "of 'editfast export RUN --lora DIR' yourself")
    resolved = [t.name for t in resolve_tasks(tasks)]
    if edits is not None:
        load_journal(edits)  # the run's files, whole, before the model loads
    device, quiet = join_ranks(device, quiet, {"tasks": resolved})
    with rank_out(out) as out, OutputDir(out, staged=True, force=force) as od:
        lm = load_model(model, dtype=dtype, device=device, max_memory=max_memory)
        agree({"model_fingerprint": lm.fingerprint})
        journal = load_journal(edits, lm)[1] if edits else None  # names, shapes, fingerprint: before evaluating
        before = evaluate(lm, tasks, protocol, limit, seed, batch_tokens, progress=not quiet, log_samples=log_samples)
        after = None
        if journal is not None:
            for ups in journal:
                for u in ups:
                    apply_update(lm, u)
            after = evaluate(lm, tasks, protocol, limit, seed, batch_tokens, progress=not quiet,
                             log_samples=log_samples)
        write_report(od.path, before, after, lm.device)
    click.echo(markdown_table(before, after))
    click.echo(f"results: {out / 'eval.json'}")


# ---------------------------------------------------------------------------------------------- stats
# The original ROME/MEMIT/EasyEdit statistics files (.npz) into and out of editfast's cache.


@cli.group("stats")
def stats_group() -> None:
    """Import the originals' statistics files (.npz) into editfast's cache, or export them."""


def stats_options(f):
    for opt in reversed([
        click.option("--model", default="smollm2-135m", show_default=True,
                     help="Model: HF directory, .gguf file, 'smollm2-135m' or 'random:<preset>'."),
        click.option("--layer", type=click.IntRange(0), default=None, help="The layer (import: read from the file "
                     "name where it names the module)."),
        click.option("--method", type=click.Choice(method_names(locate_then_edit=True), case_sensitive=False),
                     default="memit", show_default=True, help="Whose preset gives the statistics' hyper-parameters "
                     "(corpus, texts, token cut) not set otherwise."),
        click.option("--hparams", "hparams_file", type=click.Path(path_type=Path), default=None,
                     help="YAML/JSON hyper-parameters, as for 'edit' (its stats_dir is the cache location)."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one hyper-parameter."),
        click.option("--dtype", type=DTYPES, default="float32",
                     show_default=True, help="The weights' dtype the edits will use (part of the cache key)."),
        click.option("--quiet", is_flag=True, help="No progress bars, logs or warnings."),
    ]):
        f = opt(f)
    return f


def stats_setup(model, layer, method, hparams_file, sets, dtype, from_file: dict):
    """The statistics' hyper-parameters (checked before the model loads) and the cache location."""
    from editfast.methods.hparams import parse_overrides
    from editfast.methods.registry import resolve_hparams
    from editfast.models.load import model_config

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
    from editfast.methods.locate_then_edit.stats import stats_location
    from editfast.methods.locate_then_edit.stats_files import (
        file_hparams,
        import_npz,
        read_npz,
    )
    from editfast.models.load import load_model

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
    from editfast.methods.locate_then_edit.stats import stats_location
    from editfast.methods.locate_then_edit.stats_files import export_npz
    from editfast.models.load import load_model

    if layer is None:
        raise click.UsageError("--layer is required for export")
    if out.suffix != ".npz":
        raise click.UsageError(f"--out must name a .npz file, got {out}")
    hp, params, stats_dir = stats_setup(model, layer, method, hparams_file, sets, dtype, {})
    with stats_location(stats_dir):
        lm = load_model(params["model"], dtype=params["dtype"])
        export_npz(lm, layer, hp, out, progress=not quiet)
    click.echo(f"layer {layer} of {params['model']} -> {out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors (and a full disk or a permission error) become one line on stderr and
    exit code 2; Ctrl-C exits 130 and SIGTERM 143, after the same cleanup."""
    from editfast.core.errors import EditfastError

    quiet = "--quiet" in (argv if argv is not None else sys.argv[1:])
    if quiet:
        quiet_libraries()
    NOTES.clear()
    reset_terminated()
    try:
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm),
                    signal.SIGINT: signal.signal(signal.SIGINT, on_sigint)}
    except ValueError:  # not the main thread: leave the signals alone
        previous = {}
    hook, sys.unraisablehook = sys.unraisablehook, unraisable_hook(sys.unraisablehook)
    try:
        cli.main(args=argv, standalone_mode=False, prog_name="editfast")
        raise_if_terminated()
    except (click.exceptions.Abort, KeyboardInterrupt):
        fail("; ".join(["interrupted"] + NOTES), 130)
    except Terminated:
        fail("; ".join(["terminated (SIGTERM)"] + NOTES), 143)
    except click.ClickException as e:
        fail("; ".join([e.format_message().replace("\n", " ")] + NOTES))
    except EditfastError as e:
        fail("; ".join([str(e).replace("\n", " ")] + NOTES))
    except OSError as e:
        if e.errno not in ENV_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        fail("; ".join([f"{where}{e.strerror or e}"] + NOTES))
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = hook
        ranks = sys.modules.get("editfast.core.distributed")  # imported only where a command may run under torchrun
        if ranks is not None:
            ranks.leave()
