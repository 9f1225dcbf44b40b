"""Typed hyper-parameters: the base every method's class extends, with per-model presets and the
reading of hyper-parameter files.

``HParams`` holds what every method has (``layers``) and the checking of types and ranges; a
method's class adds its own fields (the locate-then-edit methods' are in
``locate_then_edit.base.LocateHParams``, under the original ROME/MEMIT names, so a file written for
the original code loads unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import re
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from editfast.core.errors import HParamsError


@dataclass
class HParams:
    """What every method's hyper-parameters have: the layers it edits; ``validate`` types and ranges."""

    layers: list[int]

    # What each field allows: "OP BOUND" (or "OP BOUND and OP BOUND") for numbers (every number of a
    # list field; None passes), a tuple of choices for strings. A subclass declares only its own
    # fields; the tables merge along the MRO.
    # Every float must also be finite, declared or not.
    RANGES: ClassVar[dict[str, str | tuple[str, ...]]] = {"layers": ">= 0"}
    # Fields that name layers of the model (a list of layers, or one layer where -1 is the last).
    LAYER_KEYS: ClassVar[tuple[str, ...]] = ("layers",)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Coerce every field to its annotated type and check its range; raise HParamsError naming the key."""
        cls = type(self)
        hints = typing.get_type_hints(cls)
        ranges = {k: v for c in reversed(cls.__mro__) for k, v in vars(c).get("RANGES", {}).items()}
        for f in dataclasses.fields(self):
            value = _check_type(f.name, getattr(self, f.name), hints[f.name])
            _check_range(f.name, value, ranges.get(f.name))
            setattr(self, f.name, value)
        if not self.layers:
            raise HParamsError("hparams: 'layers' must list at least one layer")
        if len(set(self.layers)) != len(self.layers):
            raise HParamsError(f"hparams: layers={self.layers} lists a layer twice; each layer may appear once")

    def check_modules(self, adapter: Any) -> None:
        """Raise if a field names other modules than the model adapter does (none here)."""

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


def check_layers(hp: HParams, n_layers: int) -> None:
    """Raise unless the layers hp names (``LAYER_KEYS``) exist in a model of ``n_layers`` layers (no weights needed)."""
    for key in hp.LAYER_KEYS:
        value = getattr(hp, key)
        if isinstance(value, list):
            bad = [l for l in value if not 0 <= l < n_layers]
        else:  # one layer; -1: the last
            bad = value if value >= n_layers else None
        if bad:
            raise HParamsError(f"hparams: {key} {bad} out of range for a model with {n_layers} layers")


_FLOAT = (r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
          r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")
_NUMBER = re.compile(rf"^(?:{_FLOAT})$")  # YAML 1.2's numbers: a quoted "5e-1" is a number where one is due
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Coerce value to the annotated type, or raise HParamsError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    kind = _KINDS.get(origin or hint, getattr(hint, "__name__", hint))
    bad = HParamsError(f"hparams: {name}={value!r} is not allowed; {name} must be {kind}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint in (int, float) and isinstance(value, str) and _NUMBER.match(value.strip()):
        value = _load_yaml(value.strip())  # JSON's quoted "5e-1" or "100000"
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            return float(value)
        except OverflowError:  # an int beyond float's range
            raise bad from None
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_check_type(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    return value


def _numbers(value: Any):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def _check_range(name: str, value: Any, rule: str | tuple[str, ...] | None) -> None:
    """Raise unless value is one of rule's choices, or every number in it is finite and within rule."""
    if isinstance(rule, tuple):
        if value not in rule:
            raise HParamsError(f"hparams: {name}={value!r} is not allowed; choose from {', '.join(map(repr, rule))}")
        return
    parts = [p.split() for p in (rule or ">= -inf").split(" and ")]  # "> 0 and <= 1": both must hold
    for x in _numbers(value):
        if not (math.isfinite(x) and all(_OPS[op](x, float(bound)) for op, bound in parts)):
            what = f"each number in {name}" if isinstance(value, list) else name
            kind = "an integer" if isinstance(x, int) else "a finite number"
            raise HParamsError(f"hparams: {name}={value!r} is not allowed; {what} must be {kind} {rule or ''}".rstrip())


class _Loader(yaml.SafeLoader):
    """YAML with the 1.2 core schema's floats: ``1e4``, ``5e-1``, ``.5`` are floats (YAML 1.1 reads strings),
    and a key given twice in one mapping refused (PyYAML would keep the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                again = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            if again and key != "<<":
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _NUMBER, list("-+0123456789."))


def _load_yaml(text: str) -> Any:
    """Parse YAML with 1.2 numbers; a syntax error raises ValueError with a one-line message."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{problem}{where}") from None


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` items as a dict; values are YAML (1.2 numbers), typed later by the field."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise HParamsError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = _load_yaml(text)
        except ValueError as e:
            raise HParamsError(f"--set {item!r}: the value of {key.strip()} is not valid YAML: {e}") from None
    return out


def read_hparams_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of hyper-parameters."""
    p = Path(path)
    if not p.is_file():
        raise HParamsError(f"hparams file not found: {p}")
    kind = "JSON" if p.suffix == ".json" else "YAML"
    try:
        text = p.read_text()
        data = json.loads(text) if kind == "JSON" else _load_yaml(text)
    except OSError as e:
        raise HParamsError(f"cannot read hparams file {p}: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError and _load_yaml's syntax errors
        raise HParamsError(f"hparams file {p} is not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise HParamsError(f"hparams file {p} must hold a mapping of keys to values")
    return data


# ------------------------------------------------------------------ EasyEdit's and the originals' bookkeeping keys
# Keys of EasyEdit's files (and the original repositories') that describe the run, not the method.
OPTION_KEYS = ("alg_name", "model_name", "device", "fp16", "model_parallel", "stats_dir", "max_length", "P_loc")
# Accepted, named in one warning, and otherwise without effect on an editfast edit (why, for the warning).
IGNORED_WHY = {
    "max_length": "the generation length of EasyEdit's own evaluation",
    "P_loc": "editfast computes AlphaEdit's projection from the cached statistics",
}


def warn_ignored(ignored: Sequence[str], where: str = "hparams") -> None:
    """One warning naming the accepted keys that have no effect (and why)."""
    if ignored:
        why = "; ".join(f"{k}: {IGNORED_WHY.get(k, 'not applied here')}" for k in ignored)
        warnings.warn(f"{where}: accepted without effect: {', '.join(ignored)} ({why})", UserWarning, stacklevel=3)


def model_differs(given: str, model_name: str) -> bool:
    """Whether a file's ``model_name`` names another model than ``given`` (compared by last path part)."""
    last = lambda s: re.split(r"[/:\\]", str(s).rstrip("/"))[-1].lower()
    return last(given) != last(model_name)


def inner_params_module(inner_params, method: str) -> tuple[int, str]:
    """EasyEdit's ``inner_params`` of the methods that edit one module (GRACE, WISE): one weight's name
    (``model.layers[27].mlp.down_proj.weight``) -> its layer and the module under the decoder layer."""
    if not isinstance(inner_params, list) or len(inner_params) != 1 or not isinstance(inner_params[0], str):
        raise HParamsError(f"hparams: inner_params={inner_params} must name one weight ({method} edits one module)")
    m = re.fullmatch(r"(.+?)\.(\d+)\.(.+?)(?:\.weight|\.bias)?", inner_params[0].replace("[", ".").replace("]", ""))
    if m is None:
        raise HParamsError(f"hparams: inner_params={inner_params} must name a weight of a decoder layer, e.g. "
                           "model.layers[27].mlp.down_proj.weight")
    return int(m.group(2)), m.group(3)


def check_inner_params(inner_params, layer: int, adapter) -> None:
    """``inner_params`` names a weight under this model's decoder layers (``adapter.layer_tmp``)."""
    prefix = inner_params[0].replace("[", ".").replace("]", "").split(f".{layer}.")[0]
    if f"{prefix}.{{}}" != adapter.layer_tmp:
        raise HParamsError(f"hparams: inner_params={inner_params} names layers under {prefix!r}; this model's "
                           f"decoder layers are {adapter.layer_tmp.format('N')!r}")
