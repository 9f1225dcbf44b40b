"""Options several commands share, one meaning and one unit wherever they appear, and the values an
EasyEdit/original hparams file gives the options left at their defaults (``file_options``)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import click
import torch

from editfast.core.errors import EditfastError
from editfast.methods.hparams import read_hparams_file
from editfast.methods.registry import METHODS, split_options
from editfast.models.placement import parse_max_memory

SEEDS = click.IntRange(0, 2**32 - 1)  # what every random generator editfast seeds accepts
DTYPES = click.Choice(["float32", "bfloat16", "float16"])
MODEL_HELP = "Model: HF directory, .gguf file, 'smollm2-135m' or 'random:<preset>'."


def method_names(locate_then_edit: bool = False) -> list[str]:
    return [n for n, m in METHODS.items() if m.locate_then_edit or not locate_then_edit]


def method_help() -> str:
    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())


def method_option(help: str | None = None, locate_then_edit: bool = False):
    """--method, one of the registry's (default memit; ``locate_then_edit``: only those methods);
    ``help`` defaults to every method's summary."""
    return click.option("--method", type=click.Choice(method_names(locate_then_edit), case_sensitive=False),
                        default="memit",
                        show_default=True, help=method_help() if help is None else help)


def directory(value: str | None) -> Path | None:
    """An option's directory (``~`` expanded); an empty path refused."""
    if value is not None and not str(value).strip():
        raise click.BadParameter("must name a directory, got an empty path")
    return Path(value).expanduser() if value is not None else None


def out_option(help: str, required: bool = True):
    """--out, a directory (an empty path refused)."""
    return click.option("--out", "out", type=click.Path(file_okay=False), callback=lambda c, p, v: directory(v),
                        required=required, help=help)


class DeviceType(click.ParamType):
    """--device: cpu, cuda, cuda:N, mps or auto (checked here, so a typo never waits for the model)."""

    name = "device"
    CHOICES = "cpu|cuda|cuda:N|mps|auto"

    def get_metavar(self, param, ctx=None) -> str:
        return f"[{self.CHOICES}]"

    def convert(self, value, param, ctx):
        text = str(value).strip().lower()
        if not re.fullmatch(r"cpu|mps|auto|cuda(:\d+)?", text):
            self.fail(f"{value!r} is not a device; choose from {self.CHOICES.replace('|', ', ')}", param, ctx)
        return text


def _max_memory(ctx, param, value):
    try:
        return parse_max_memory(value)
    except EditfastError as e:
        raise click.BadParameter(str(e).removeprefix("--max-memory ")) from None


def hparams_option(help: str):
    return click.option("--hparams", "hparams_file", type=click.Path(path_type=Path), default=None, help=help)


def sets_option(help: str = "Override one hyper-parameter (repeatable)."):
    return click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=help)


model_option = click.option("--model", default="smollm2-135m", show_default=True, help=MODEL_HELP)
seed_option = click.option("--seed", type=SEEDS, default=0, show_default=True)
dtype_option = click.option("--dtype", type=DTYPES, default="float32", show_default=True, help="Weights' dtype.")
device_option = click.option("--device", type=DeviceType(), default="cpu", show_default=True,
                             help="Where the model runs; auto: its layers over the GPUs, then the CPU, then disk "
                                  "(accelerate's device_map='auto'; under torchrun, each rank its share of the GPUs).")
max_memory_option = click.option("--max-memory", "max_memory", default=None, callback=_max_memory,
                                 metavar="DEV=SIZE,...",
                                 help="With --device auto: the most memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB.")
force_option = click.option("--force", is_flag=True, help="Replace what --out holds (only once every check passed).")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars, logs or warnings.")


def file_options(hparams_file, params: dict) -> dict:
    """An EasyEdit/original hparams file's bookkeeping keys (``hparams.split_options``) as the values of
    the options the user left at their defaults: method (alg_name), model (model_name), dtype (fp16),
    device (device; cuda:N falls back to cpu, with a warning, where no GPU is; model_parallel: true ->
    auto). Returns the options."""
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
        if not torch.cuda.is_available():
            warnings.warn(f"{hparams_file}: device {opts['device']} but no CUDA device here; using cpu", UserWarning)
            params["device"] = "cpu"
    return opts
