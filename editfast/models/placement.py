"""Models spread over devices: ``device_map="auto"`` / ``max_memory`` through accelerate.

    lm = load_model("path/to/70b", dtype="bfloat16", device="auto", max_memory="0=70GiB,1=70GiB,cpu=200GiB")

accelerate places whole decoder layers on the GPUs in order, then on the CPU, then on disk, and
hooks every placed module so that its inputs move to its device. A layer "offloaded" to the CPU
or disk keeps its parameters on the meta device; its hook copies them in from a weights map
before each forward. Everything that reads or writes a weight therefore asks this module:

- ``param_tensor(model, name)``: the tensor that holds a parameter's values: the parameter
  itself, or, offloaded to the CPU, its entry in the hook's weights map (an edit written there is
  what the next forward loads). A weight offloaded to disk cannot be edited (a read-only file);
  the error says to give the model more memory;
- ``execution_device(module)``: where a module computes (its hook's device, else its weights');
- ``input_device(model)``: where token ids go (the input embedding's execution device).

Layers that go to disk are written to a temporary folder (``OffloadFolder``), removed when the
model is collected or the process ends, and at once when loading fails. A device map that puts
the whole model on disk (too little GPU and CPU memory for even its largest piece) is refused with
one line before anything is offloaded (``check_device_map``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from typing import Any

import torch
from torch import nn

from editfast.core.errors import EditfastError, ModelError


def _hook(module: nn.Module):
    return getattr(module, "_hf_hook", None)


def _weights_map_entry(owner: nn.Module, leaf: str, name: str) -> torch.Tensor:
    hook = _hook(owner)
    wm = getattr(hook, "weights_map", None)
    if wm is None:
        raise EditfastError(f"the weight {name!r} is on the meta device with no offloaded copy: the model's "
                            "weights were never loaded")
    loader, key = getattr(wm, "dataset", wm), getattr(wm, "prefix", "") + leaf
    ram = getattr(loader, "state_dict", None)
    if isinstance(ram, dict) and key in ram:
        return ram[key]
    raise EditfastError(f"the weight {name!r} is offloaded to disk, which editfast cannot edit in place: give the "
                        "model more GPU or CPU memory (--max-memory) so that the edited layers stay in memory")


def param_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor holding parameter ``name``'s values (see the module's docstring)."""
    param = model.get_parameter(name)
    if not param.is_meta:
        return param
    owner, _, leaf = name.rpartition(".")
    return _weights_map_entry(model.get_submodule(owner) if owner else model, leaf, name)


def execution_device(module: nn.Module) -> torch.device:
    hook = _hook(module)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    p = next((p for p in module.parameters() if not p.is_meta), None)
    return p.device if p is not None else torch.device("cpu")


def resident_weight(module: nn.Module) -> torch.Tensor:
    """A module's weight with its values, on the module's execution device (a copy when offloaded)."""
    w = module.weight
    if not w.is_meta:
        return w
    return _weights_map_entry(module, "weight", "weight").to(execution_device(module))


def input_device(model: nn.Module) -> torch.device:
    return execution_device(model.get_input_embeddings())


def parse_max_memory(text: str | dict | None) -> dict | None:
    """``0=20GiB,1=20GiB,cpu=60GiB`` -> {0: "20GiB", 1: "20GiB", "cpu": "60GiB"} (accelerate's form)."""
    if text is None or isinstance(text, dict):
        return text
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not eq or not re.fullmatch(r"\d+|cpu|disk|cuda:\d+", key) or not re.fullmatch(
                r"\d+(\.\d+)?\s*([KMGT]i?B)?", size, re.IGNORECASE):
            raise ModelError(f"--max-memory {text!r}: expected DEVICE=SIZE pairs such as 0=20GiB,cpu=60GiB "
                             f"(DEVICE a GPU index or cpu), got {part!r}")
        size = int(size) if size.isdigit() else size  # bytes: accelerate reads a bare "0" as no size at all
        out[int(key.removeprefix("cuda:")) if key != "cpu" and key != "disk" else key] = size
    return out or None


def rank_max_memory(max_memory: dict | None) -> dict | None:
    """Under torchrun, one rank's share of the GPUs: rank LOCAL_RANK of LOCAL_WORLD_SIZE places its
    model on its own consecutive block of GPUs (the others get no memory)."""
    n_local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if n_local <= 1 or not torch.cuda.is_available():
        return max_memory
    gpus, local = torch.cuda.device_count(), int(os.environ.get("LOCAL_RANK", "0"))
    per = gpus // n_local
    if per < 1:
        raise ModelError(f"--device auto under torchrun: {n_local} ranks on this node share {gpus} GPUs; start at "
                         "most one rank per GPU")
    mine = range(local * per, (local + 1) * per)
    given = max_memory or {}
    out = {i: given.get(i, torch.cuda.get_device_properties(i).total_memory) for i in mine}
    out.update({k: v for k, v in given.items() if k in ("cpu", "disk")})
    return out


class OffloadFolder:
    """Where accelerate writes the layers a device map puts on disk: a name in the temporary
    directory (made only if layers go there), removed by ``remove`` (a failed load) or, once a model
    uses it (``keep_while``), when that model is collected or the process ends."""

    def __init__(self):
        self.path = os.path.join(tempfile.gettempdir(), f"editfast-offload-{os.getpid()}-{id(self):x}")

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def keep_while(self, model: nn.Module) -> None:
        weakref.finalize(model, shutil.rmtree, self.path, True)


def check_device_map(device_map: dict[str, Any] | None, max_memory: dict | None) -> None:
    """Refuse a device map that puts the whole model on disk: nothing would compute anywhere."""
    if device_map and all(d == "disk" for d in device_map.values()):
        given = ",".join(f"{k}={v}" for k, v in (max_memory or {}).items()) or "the free memory"
        raise ModelError(f"--max-memory {given} is too little: no layer of the model fits on a GPU or in CPU "
                         "memory, so the whole model would be offloaded to disk; give the GPUs or the CPU more")


def dispatch(model: nn.Module, max_memory: dict | None, offload_dir: str, asked: dict | None = None) -> nn.Module:
    """Place a model built in CPU memory (a random preset) as ``device_map="auto"`` would load it."""
    from accelerate import dispatch_model, infer_auto_device_map  # only device maps need it

    device_map = infer_auto_device_map(model, max_memory=max_memory,
                                       no_split_module_classes=getattr(model, "_no_split_modules", None) or [],
                                       dtype=next(model.parameters()).dtype)
    check_device_map(device_map, max_memory if asked is None else asked)
    model.hf_device_map = device_map
    return dispatch_model(model, device_map, offload_dir=offload_dir)
