"""Typed hyper-parameters of the locate-then-edit methods, with per-model presets.

The field names are the original ROME/MEMIT names, so a hyper-parameter file written for the
original code (``hparams/ROME/gpt2-xl.json``) loads here unchanged. The module-name keys of
those files (``rewrite_module_tmp`` and friends) are accepted and checked against the model
adapter, which is the single place that knows module names.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import HParamsError

# Module-name keys of the original hparams files. Accepted for drop-in compatibility and
# checked against the adapter; they never override it.
MODULE_KEYS = {
    "rewrite_module_tmp": "rewrite_tmp",
    "layer_module_tmp": "layer_tmp",
    "mlp_module_tmp": "mlp_tmp",
    "attn_module_tmp": "attn_tmp",
    "ln_f_module": "final_norm",
    "lm_head_module": None,  # the original uses the tied embedding or lm_head; we read the head
}


@dataclass
class HParams:
    layers: list[int]
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int = -1  # -1: the model's last layer
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True
    mom2_dataset: str = "wikitext"
    mom2_n_samples: int = 1000
    mom2_dtype: str = "float32"
    mom2_max_tokens: int = 128  # each corpus text is cut at this many tokens
    # Original module-name keys (validated against the adapter, see MODULE_KEYS).
    rewrite_module_tmp: str | None = None
    layer_module_tmp: str | None = None
    mlp_module_tmp: str | None = None
    attn_module_tmp: str | None = None
    ln_f_module: str | None = None
    lm_head_module: str | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise HParamsError("hparams: 'layers' must list at least one layer")
        if self.fact_token != "subject_last":
            raise HParamsError(f"hparams: fact_token {self.fact_token!r} is not supported (only 'subject_last')")
        if self.v_num_grad_steps < 1:
            raise HParamsError("hparams: v_num_grad_steps must be >= 1")
        if self.mom2_dtype not in ("float32", "float64"):
            raise HParamsError(f"hparams: mom2_dtype must be float32 or float64, got {self.mom2_dtype!r}")
        for name in ("v_lr", "clamp_norm_factor"):
            if getattr(self, name) <= 0:
                raise HParamsError(f"hparams: {name} must be > 0")

    def loss_layer(self, n_layers: int) -> int:
        """The layer whose output gives the target loss (the original uses max(v_loss_layer, layer))."""
        last = n_layers - 1 if self.v_loss_layer < 0 else self.v_loss_layer
        return max(last, max(self.layers))

    def check_modules(self, adapter: Any) -> None:
        """Raise if a module-name key names other modules than the model adapter does."""
        for key, attr in MODULE_KEYS.items():
            given = getattr(self, key)
            if given is None or attr is None:
                continue
            if given != getattr(adapter, attr):
                raise HParamsError(
                    f"hparams: {key}={given!r} does not match the model ({getattr(adapter, attr)!r})"
                )

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# Model families with presets (each method declares its values per family in its own file).
FAMILIES = ("gpt2-xl", "gpt-j-6b", "llama-2-7b", "smollm2-135m", "tiny")


def preset_name_for(spec: str, config: Any) -> str | None:
    """The preset that fits a model: by spec name first, then by (layers, width) shape."""
    name = spec.split(":", 1)[-1].lower()
    if name in FAMILIES:
        return name
    shape = (getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None),
             getattr(config, "hidden_size", None) or getattr(config, "n_embd", None))
    by_shape = {(48, 1600): "gpt2-xl", (28, 4096): "gpt-j-6b", (32, 4096): "llama-2-7b", (30, 576): "smollm2-135m"}
    if shape in by_shape:
        return by_shape[shape]
    if shape[0] == 4:
        return "tiny"
    return None


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Coerce value to the annotated type, or raise HParamsError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = HParamsError(f"hparams: {name} must be {getattr(hint, '__name__', hint)}, got {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_check_type(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    return value


def make_hparams(method: str, values: dict[str, Any]) -> HParams:
    """Build the method's hparams from a dict; unknown keys and wrong types are errors."""
    from .methods import METHODS

    if str(method).lower() not in METHODS:
        raise HParamsError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[str(method).lower()].hparams_class
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise HParamsError(
            f"hparams: unknown key(s) {', '.join(unknown)} for {method}; valid keys: {', '.join(names)}"
        )
    if "layers" not in values:
        raise HParamsError("hparams: 'layers' is required")
    clean = {k: _check_type(k, v, hints[k]) for k, v in values.items()}
    return cls(**clean)


def read_hparams_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of hyper-parameters."""
    p = Path(path)
    if not p.is_file():
        raise HParamsError(f"hparams file not found: {p}")
    try:
        text = p.read_text()
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise HParamsError(f"hparams file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise HParamsError(f"hparams file {p} must hold a mapping of keys to values")
    return data


def resolve_hparams(method: str, spec: str, config: Any, overrides: dict[str, Any] | None = None,
                    file: str | Path | None = None) -> HParams:
    """Preset for the model, then the file's values, then explicit overrides."""
    from .methods import get_method

    try:
        m = get_method(method)
    except Exception as e:
        raise HParamsError(str(e)) from None
    values: dict[str, Any] = {}
    preset = preset_name_for(spec, config)
    if preset is not None and preset in m.presets:
        values.update(m.presets[preset])
    if file is not None:
        values.update(read_hparams_file(file))
    values.update(overrides or {})
    if "layers" not in values:
        raise HParamsError(
            f"no {m.name} hparams preset for model {spec!r}; give --hparams FILE with at least 'layers' "
            f"(presets: {', '.join(p for p in m.presets if p != 'tiny')})"
        )
    return make_hparams(m.name, values)
