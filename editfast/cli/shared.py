"""Steps several commands share: the hyper-parameters checked before the model loads (``preflight``),
torchrun's ranks joined (``join_ranks``), and the model saved into the output folder
(``save_model_to``)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import click

from editfast.core import distributed as dist
from editfast.core.errors import raise_if_terminated
from editfast.core.paths import normal_permissions
from editfast.methods.hparams import check_layers
from editfast.methods.locate_then_edit.stats import check_corpus
from editfast.methods.registry import get_method, resolve_hparams
from editfast.models import routing
from editfast.models.archs import adapter_for
from editfast.models.load import model_config


def preflight(model: str, method: str, hparams_file, overrides: dict, options: dict | None = None,
              dtype: str = "float32"):
    """The hyper-parameters, resolved and checked against the model's config before its weights load
    (the corpus too, when the method needs statistics: ``stats.check_corpus``). ``options`` receives
    the hparams file's bookkeeping keys (``hparams.split_options``)."""
    config = model_config(model)
    adapter = adapter_for(config)
    hp = resolve_hparams(method, model, config, overrides, hparams_file, options={} if options is None else options)
    hp.check_modules(adapter)
    check_layers(hp, int(getattr(config, adapter.n_layers_attr)))
    if getattr(hp, "mom2_dataset", None) is not None and get_method(method).needs_statistics(hp):
        check_corpus(hp, dtype)
    return hp


def join_ranks(device: str, quiet: bool, resolved: dict) -> tuple[str, bool]:
    """Under torchrun: join the process group, check that every rank resolved the same options and
    ``resolved`` configuration (else one line, exit 2), and return this rank's device (cuda:LOCAL_RANK)
    and whether it is quiet (ranks other than 0 show nothing on stdout). Otherwise the identity."""
    if not dist.init(device):
        return device, quiet
    params = dict(click.get_current_context().params)
    dist.agree({"command": click.get_current_context().info_name, "options": params, **resolved})
    if not dist.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of this rank's life)
        quiet = True
    return dist.local_device(device), quiet


def save_model_to(lm, out: Path, card: str | None = None) -> None:
    """The model's safetensors and tokenizer (a routed model's memory as routing.json and
    routing.safetensors beside them, ``models.routing.save``), and its model card ``card`` as README.md, into OUT/model
    (a hidden folder, then renamed; the permissions a plain mkdir/open gives, not mkdtemp's 0700)."""
    target = out / "model"
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=out))
    try:
        lm.model.save_pretrained(tmp, safe_serialization=True)  # a routed model: its base weights
        routing.save(lm.model, tmp)  # and its memory beside them, which editfast's loader re-installs
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
