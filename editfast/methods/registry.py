"""The registry of editing methods, and building a method's hyper-parameters.

Every module or package in ``editfast.methods`` that defines ``METHOD`` (an instance of
``base.Method``) is a method; the CLI's choices, the API, template generation and hyper-parameter loading all read
``METHODS``. Nothing outside this package names a method.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import warnings
from pathlib import Path
from typing import Any

from editfast.core.errors import EditfastError, HParamsError
from editfast.methods.base import Method
from editfast.methods.hparams import (
    OPTION_KEYS,
    HParams,
    model_differs,
    preset_name_for,
    read_hparams_file,
    warn_ignored,
)


def _discover() -> dict[str, Method]:
    found = {}
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if info.name in ("base", "registry", "hparams", "locate_then_edit"):
            continue
        m = getattr(importlib.import_module(f"editfast.methods.{info.name}"), "METHOD", None)
        if isinstance(m, Method):
            found[m.name] = m
    return found


METHODS: dict[str, Method] = _discover()


def get_method(name: str) -> Method:
    key = str(name).lower()
    if key not in METHODS:
        raise EditfastError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[key]


def make_hparams(method: str, values: dict[str, Any]) -> HParams:
    """Build the method's hparams from a dict; unknown keys and wrong types are errors."""

    if str(method).lower() not in METHODS:
        raise HParamsError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[str(method).lower()].hparams_class
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(map(str, set(values) - set(names)))
    if unknown:
        raise HParamsError(
            f"hparams: unknown key(s) {', '.join(unknown)} for {method}; valid keys: {', '.join(names)}"
        )
    if "layers" not in values and "inner_params" not in values:  # EasyEdit's inner_params name the layer (GRACE)
        raise HParamsError("hparams: 'layers' is required")
    return cls(**values)  # types and ranges: HParams.validate


def _alg(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def method_of_alg(alg_name: Any, values: dict[str, Any], prefer: str | None = None) -> str | None:
    """The method an hparams file's ``alg_name`` names: a method of that name, else one whose
    ``easyedit_alg`` it is and that ``claims`` the file's values (FT: FT-L or FT-M by the objective),
    ``prefer`` if it does; None if none."""
    key = _alg(alg_name)
    by_name = {_alg(n): n for n in METHODS}
    if key in by_name:
        return by_name[key]
    shared = [m for m in METHODS.values() if m.easyedit_alg and _alg(m.easyedit_alg) == key]
    claimed = [m.name for m in shared if m.claims(values)] or [m.name for m in shared]
    if prefer is not None and str(prefer).lower() in claimed:
        return str(prefer).lower()
    return claimed[0] if claimed else None


def split_options(values: dict[str, Any],
                  method: str | None = None) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Split an EasyEdit / original hparams mapping into ``(hparams_values, options, ignored)``.

    ``values`` is the mapping as read from the file (``read_hparams_file``); it is not changed.

    hparams_values  every key that is not a bookkeeping key (``OPTION_KEYS``), unchanged: give it to
                    ``make_hparams``, which rejects unknown keys and checks types and ranges.
    options         the bookkeeping keys as editfast options, each present only if its key was:
                      method      the registry's name for ``alg_name`` ("ROME" -> "rome")
                      model       ``model_name`` as written (a directory or a model name)
                      device      ``device``: an int N -> "cuda:N", a string as given
                      dtype       ``fp16``: true -> "float16", false -> "float32"
                      device_map  ``model_parallel``: true -> "auto" (load with device="auto",
                                  accelerate's device_map), false -> None
                      stats_dir   ``stats_dir`` as a Path: where the statistics cache lives
                      max_length  ``max_length`` (an int); P_loc: ``P_loc`` (a string)
    ignored         the keys whose value editfast does not use (``IGNORED_WHY``: ``max_length``,
                    ``P_loc``); the caller warns once naming them.

    Raises HParamsError (one line naming the key) for a value editfast cannot honour: an
    ``alg_name`` that is not ``method`` (when given) or no method of editfast's, or a value of the
    wrong type. A method whose hparams class has a field of the same name (AlphaEdit's
    ``model_name``) also keeps the key in ``hparams_values``.
    """

    hp_values = {k: v for k, v in values.items() if k not in OPTION_KEYS}
    options: dict[str, Any] = {}
    ignored: list[str] = []

    def bad(key: str, must: str) -> HParamsError:
        return HParamsError(f"hparams: {key}={values[key]!r} is not allowed; {key} must be {must}")

    if "alg_name" in values:
        if not isinstance(values["alg_name"], str):
            raise bad("alg_name", "a method's name (a string)")
        name = method_of_alg(values["alg_name"], values, method)
        if name is None:
            raise HParamsError(f"hparams: alg_name={values['alg_name']!r} is not a method of editfast "
                               f"({', '.join(METHODS)})")
        if method is not None and _alg(method) != _alg(name):
            raise HParamsError(f"hparams: alg_name={values['alg_name']!r} does not match the method {method!r}; "
                               f"edit with --method {name} or use a {method} file")
        options["method"] = name
    if "model_name" in values:
        if not isinstance(values["model_name"], str) or not values["model_name"].strip():
            raise bad("model_name", "a model directory or name")
        options["model"] = values["model_name"]
    if "device" in values:
        d = values["device"]
        if isinstance(d, int) and not isinstance(d, bool) and d >= 0:
            options["device"] = f"cuda:{d}"
        elif isinstance(d, str) and d.strip():
            options["device"] = d.strip()
        else:
            raise bad("device", "a GPU number or a device name (cpu, cuda:1)")
    for key, opt, yes, no in (("fp16", "dtype", "float16", "float32"), ("model_parallel", "device_map", "auto", None)):
        if key in values:
            if not isinstance(values[key], bool):
                raise bad(key, "true or false")
            options[opt] = yes if values[key] else no
    if "stats_dir" in values:
        if not isinstance(values["stats_dir"], str) or not values["stats_dir"].strip():
            raise bad("stats_dir", "a directory")
        options["stats_dir"] = Path(values["stats_dir"]).expanduser()
    if "max_length" in values:
        ml = values["max_length"]
        if isinstance(ml, bool) or not isinstance(ml, int) or ml < 1:
            raise bad("max_length", "a positive integer")
        options["max_length"] = values["max_length"]
        ignored.append("max_length")
    if "P_loc" in values:
        if not isinstance(values["P_loc"], str):
            raise bad("P_loc", "a file name")
        options["P_loc"] = values["P_loc"]
        ignored.append("P_loc")
    if method is not None and str(method).lower() in METHODS:
        fields = {f.name for f in dataclasses.fields(METHODS[str(method).lower()].hparams_class)}
        hp_values.update({k: values[k] for k in OPTION_KEYS if k in values and k in fields})
    return hp_values, options, ignored


def resolve_hparams(method: str, spec: str, config: Any, overrides: dict[str, Any] | None = None,
                    file: str | Path | None = None, options: dict[str, Any] | None = None) -> HParams:
    """Preset for the model, then the file's values, then explicit overrides.

    The file may be EasyEdit's or the original repositories' (``split_options``): its bookkeeping
    keys are checked (``alg_name`` must be ``method``). With ``options`` (a dict), they are put
    there for the caller to apply (the CLI does: model, device, dtype, statistics location) and
    only ``ignored`` ones are warned about; without, one warning names every bookkeeping key that
    this call cannot apply. A ``model_name`` that differs from ``spec`` is warned about.
    """

    try:
        m = get_method(method)
    except Exception as e:
        raise HParamsError(str(e)) from None
    values: dict[str, Any] = {}
    preset = preset_name_for(spec, config)
    if preset is not None and preset in m.presets:
        values.update(m.presets[preset])
    if file is not None:
        raw = read_hparams_file(file)
        file_values, opts, ignored = split_options(raw, m.name)
        values.update(file_values)
        if "model" in opts and spec and model_differs(spec, opts["model"]):
            warnings.warn(f"{file}: model_name={opts['model']!r} differs from the model edited ({spec}); "
                          f"its hyper-parameters are used for {spec}", UserWarning, stacklevel=2)
        if options is not None:
            options.update(opts)
        else:  # nothing but alg_name is applied by this call
            ignored = [k for k in OPTION_KEYS if k in raw and k != "alg_name"]
        warn_ignored(ignored, str(file))
    values.update(overrides or {})
    if "layers" not in values and "inner_params" not in values:
        raise HParamsError(
            f"no {m.name} hparams preset for model {spec!r}; give --hparams FILE with at least 'layers' "
            f"(presets: {', '.join(p for p in m.presets if p != 'tiny')})"
        )
    return make_hparams(m.name, values)
