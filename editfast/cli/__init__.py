"""Command line: ``editfast edit | eval | undo | export | export-base | study | train-mend | stats``.

``main`` chooses the CPU threads' wait policy before torch loads (``core.threads``), then runs the
command under the exit-code policy (``exits``): bad input is one line on stderr and exit code 2,
SIGINT 130, SIGTERM 143. Each command lives in a module of its own, imported only when the command
runs (``LazyGroup``), so ``editfast --help`` loads no torch. Options, hyper-parameters and data are
checked before the model loads. Output directories are transactions (``outputs.OutputDir``): one
writer at a time, a non-empty --out only with --resume or --force, and a failed or interrupted run
leaves either nothing or, for an edit run, its complete journal batches to resume.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings

import click

from editfast.cli.exits import run
from editfast.core.threads import choose_wait_policy

# name -> (module:command, the opening paragraph of its help, which `editfast --help` lists)
COMMANDS = {
    "edit": ("editfast.cli.edit:edit_cmd", "Apply N edits from a dataset in sequential batches; report efficacy, "
             "paraphrase and neighbourhood scores, and with --eval-at the curve of abilities against the number of "
             "edits."),
    "eval": ("editfast.cli.eval:eval_cmd", "Measure general abilities (eight task categories + WikiText perplexity)."),
    "export": ("editfast.cli.export:export_cmd", "A PEFT LoRA adapter of the run's edits: loaded with peft on the "
               "base model it is the edited model (servable by vLLM's multi-LoRA where the rank is at most 512)."),
    "export-base": ("editfast.cli.export_base:export_base_cmd", ("A model (smollm2-135m, a .gguf file, a random: "
                    "preset, ...) as a folder in Hugging Face layout, for transformers and PEFT's "
                    "AutoPeftModelForCausalLM.")),
    "stats": ("editfast.cli.stats:stats_group", "Import the originals' statistics files (.npz) into editfast's "
              "cache, or export them."),
    "study": ("editfast.cli.study:study_cmd", "A grid of sequential editing sessions (methods x settings) on one "
              "model and dataset: ability against the number of edits, with study.json, report.md and one plot per "
              "task."),
    "train-mend": ("editfast.cli.train_mend:train_mend_cmd", "Train MEND's editor network for a model (Mitchell et "
                   "al., 2022) and save it for 'editfast edit --method mend --mend OUT'."),
    "undo": ("editfast.cli.undo:undo_cmd", "The run's weights after K edits: the base model with the journal's "
             "batches 1..K replayed (exact: the same weights the run had after K edits)."),
}
TORCHRUN_COMMANDS = ("edit", "eval")  # data-parallel under torchrun (statistics, evaluation)


class LazyGroup(click.Group):
    """A group whose commands are imported when one runs (click's "lazily loading subcommands"):
    ``get_command`` imports the command's module; ``--help`` lists COMMANDS without importing any."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))  # as click.Group's listing, from stand-ins
        with formatter.section("Commands"):
            formatter.write_dl([(n, click.Command(n, help=COMMANDS[n][1]).get_short_help_str(limit)) for n in names])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="editfast")
@click.pass_context
def cli(ctx) -> None:
    """Fast locate-then-edit knowledge editing and its side effects on general abilities."""
    from editfast.core.distributed import launched  # torch: the command's module has loaded it by now

    if launched() and ctx.invoked_subcommand not in TORCHRUN_COMMANDS:
        raise click.UsageError(f"torchrun runs {' and '.join(TORCHRUN_COMMANDS)} data-parallel; "
                               f"run {ctx.invoked_subcommand} as one process")


def quiet_libraries() -> None:
    """--quiet: no progress bars, info logs or warnings from transformers and friends either."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=RuntimeWarning, module=r"editfast\.")  # ours: a cache rebuilt ...
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging  # heavy; only with --quiet

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars  # heavy; only with --quiet

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> None:
    """Entry point: the wait policy (before torch loads), --quiet's silence, then the command under
    the exit-code policy (``exits.run``); torchrun's process group is left at the end."""
    choose_wait_policy()
    if "--quiet" in (argv if argv is not None else sys.argv[1:]):
        quiet_libraries()
    try:
        run(lambda: cli.main(args=argv, standalone_mode=False, prog_name="editfast"))
    finally:
        ranks = sys.modules.get("editfast.core.distributed")  # imported only where a command may run under torchrun
        if ranks is not None:
            ranks.leave()
