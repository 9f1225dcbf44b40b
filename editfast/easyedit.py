"""EasyEdit's Python API on editfast's fast path: change only the import line of an EasyEdit script.

    from editfast.easyedit import BaseEditor, ROMEHyperParams      # was: from easyeditor import ...
    hparams = ROMEHyperParams.from_hparams("./hparams/ROME/llama-7b")
    editor = BaseEditor.from_hparams(hparams)
    metrics, edited_model, weights_copy = editor.edit(
        prompts=prompts, ground_truth=ground_truth, target_new=target_new, subject=subject,
        rephrase_prompts=rephrase_prompts, locality_inputs=locality_inputs,
        portability_inputs=portability_inputs, sequential_edit=False)

Read from EasyEdit (github zjunlp/EasyEdit at 14cea82, 2026-07: ``editors/editor.py``,
``editors/utils.py``, ``evaluate/evaluate.py``, ``evaluate/evaluate_utils.py``,
``evaluate/metric_meta.py``); the returned values have its keys and meanings:

- one dict per edit: ``edit``: ``{"pre", "case_id", "requested_rewrite", "post"}`` (``case_id`` = the
  index of the edit); ``batch_edit``: ``{"case_id", "requested_rewrite", "pre", "time", "post"}``
  (``case_id`` = the index inside its batch, ``time`` = that batch's editing seconds), as EasyEdit;
- ``pre`` / ``post``: ``rewrite_acc`` ([acc] of ``target_new`` after the prompt), ``rephrase_acc``
  (the same on the rephrase prompt, when given), ``locality`` {``KEY_output``: the model's argmax
  tokens at the positions of the locality ground truth, teacher-forced; in ``post`` also
  ``KEY_acc``: per locality prompt, the share of those tokens equal to the *unedited model's own*
  (``pre``) — not to the ground truth}, ``portability`` {``KEY_acc``: [acc] of the ground truth},
  ``metric_meta`` (EasyEdit's protocol labels). acc = teacher-forced token accuracy: prompt + " " +
  target tokenised as one text, the target's tokens those after the prompt's, each hit when it is
  the model's argmax at the position before it; a group of prompts (a list) runs as one
  left-padded batch, as EasyEdit runs it;
- ``edited_model`` is the HF model (edited in place, as EasyEdit's ``copy=False``): after
  ``sequential_edit=False`` it holds the original weights again (each edit was undone after its
  ``post`` was measured); ``weights_copy`` maps each parameter the last edit changed to its value
  before that edit.

Restoring: ``sequential_edit=False`` (the default) evaluates each edit (``edit``: each request;
``batch_edit``: each batch) on the model edited by it alone and restores the weights bit for bit
afterwards (a snapshot, not a subtraction), and the method's state too (AlphaEdit's accumulated
keys; EasyEdit keeps those in a global across restored edits). ``sequential_edit=True`` keeps every
edit. ``keep_original_weight``: EasyEdit since 2024 no longer has the parameter (it is swallowed by
``**kwargs``); ``True`` (restore after each edit) is honoured and refused together with
``sequential_edit=True``; ``False``, which made EasyEdit before mid-2024 keep the edits, is warned
about: pass ``sequential_edit=True`` for that.

The file's bookkeeping keys are read as ``editfast edit --hparams`` reads them (``hparams.split_options``,
checked when the object is made and when an editor is): ``alg_name`` must be the class's, ``model_name``
the model, ``device`` N is cuda:N (the CPU, with a warning, without CUDA), ``fp16`` loads float16,
``stats_dir`` is where the statistics cache lives (relative to the working directory, as in EasyEdit);
``max_length`` and ``P_loc`` are accepted with one warning. ``batch_size`` is the editor's own key.

The edits themselves are editfast's (``methods/``): one ``prepare`` (statistics from the cache) and
one set of context templates per editor, batched target optimisation, the factorise-once solve.
Not supported, with an error naming them: ``test_generation=True``, ``eval_metric`` other than
token accuracy (``ppl``, ``ood_ppl``), ``train_ds`` (IKE), ``metric_kwargs``, ``loc_prompts``,
``generate_edit``/``normal_edit``/``deep_edit``, a (model, tokenizer) pair
as ``model_name``. ``model_parallel: true`` loads with ``device="auto"`` (accelerate's device map; tested
on the CPU only). EasyEdit's chat template and LLM-judge paths belong to hparams keys its ROME,
MEMIT and AlphaEdit classes do not have. ``summary_metrics`` prints EasyEdit's summary and returns
it (``edit`` calls it when ``verbose``); it does not write ``./logs/results.json``.

Methods: ROME, MEMIT, AlphaEdit, EMMET and r-ROME, whose EasyEdit files map key for key onto
editfast's hparams. Left out: PMET (EasyEdit's ``mlp_module_tmp`` names the down projection, the
adapter the MLP), KN (its ``batch_size`` is integration steps per pass, which EasyEdit's own ``edit``
refuses unless it is 1; its ``weights_copy`` is a callable), MEND (a trained network from a pickle)
and UltraEdit (no shipped hparams files of this shape).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch

from editfast.core.errors import EditfastError, HParamsError, RequestError
from editfast.core.paths import write_json
from editfast.data.requests import Request, validate_requests
from editfast.methods.base import Method
from editfast.methods.hparams import (
    OPTION_KEYS,
    check_layers,
    read_hparams_file,
    warn_ignored,
)
from editfast.methods.locate_then_edit.stats import check_corpus, stats_location
from editfast.methods.registry import METHODS, get_method, make_hparams, split_options
from editfast.models.archs import adapter_for
from editfast.models.load import load_model, model_config
from editfast.models.update import guard, restore, snapshot
from editfast.session.session import check_lengths, edit_batch

LOG = logging.getLogger(__name__)

# The editor's own key (EasyEdit's BaseEditor reads it), not one of the files' bookkeeping keys
# (hparams.OPTION_KEYS, which split_options checks and maps).
_EDITOR_KEYS = ("batch_size",)
_TOKEN_METRICS = ("exact match", "token_em")  # EasyEdit's eval_metric values that mean token accuracy
_LM_META = {"protocol": "decoder_only_teacher_forcing", "scorer": "token_accuracy",
            "comparable_group": "lm.decoder_only_teacher_forcing.token_accuracy"}
_LOCALITY_META = {"protocol": "pre_post_argmax_token_match", "scorer": "token_match",
                  "comparable_group": "locality.lm.pre_post_argmax_token_match"}


def _method_of(alg_name: str) -> Method:
    """The method run for EasyEdit's ``alg_name`` (the one whose ``easyedit_alg`` it is)."""
    return next(m for m in METHODS.values() if m.easyedit_alg == alg_name)


class HyperParams:
    """An EasyEdit hyper-parameter object: attributes are the file's keys (``hparams.layers``,
    ``hparams.model_name``, ``hparams.batch_size = 10`` ...). The bookkeeping keys are checked by
    ``hparams.split_options``, the method's by editfast's hparams class, when the object is made and
    again whenever an editor uses it."""

    alg_name: ClassVar[str] = ""
    method: ClassVar[str] = ""  # editfast's method name: the one whose ``easyedit_alg`` is alg_name
    defaults: ClassVar[dict[str, Any]] = {"max_length": 40, "model_parallel": False, "fp16": False}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        m = _method_of(cls.alg_name)
        cls.method = m.name
        if m.batchable:  # the editor's batch_size, 1 unless set (EasyEdit's default)
            cls.defaults = {**cls.defaults, "batch_size": 1}

    def __init__(self, **config: Any):
        object.__setattr__(self, "_config", dict(config))
        values, _, ignored = self._split()
        warn_ignored(ignored, type(self).__name__)
        hp = self.editfast_hparams()
        self._config.update({k: getattr(hp, k) for k in values})  # typed as editfast reads them ("5e-1": 0.5)

    def _split(self) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """``hparams.split_options`` on the keys as they are now: (the method's values, editfast options,
        ignored keys); the bookkeeping keys checked (``alg_name`` must be this class's)."""
        d = {"alg_name": self.alg_name,
             **{k: v for k, v in self._config.items() if k not in _EDITOR_KEYS}}
        for key in ("model_name", "device"):  # Python objects a file cannot hold
            if isinstance(d.get(key), (Path, torch.device)):
                d[key] = str(d[key])
        if "model_name" in d and not isinstance(d["model_name"], str):
            raise HParamsError("hparams model_name must be a model: a local Hugging Face directory, a .gguf file, "
                               "smollm2-135m or random:<preset> (a (model, tokenizer) pair is not supported)")
        try:
            return split_options(d, self.method)
        except HParamsError as e:
            raise HParamsError(f"{type(self).__name__}: {e}") from None

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | Path) -> HyperParams:
        """Read an EasyEdit YAML (or JSON) file; ``path`` may leave out ``.yaml`` as EasyEdit's calls do."""
        path = Path(hparams_name_or_path)
        if path.suffix not in (".yaml", ".yml", ".json"):
            path = Path(f"{path}.yaml")
        return cls(**read_hparams_file(path))

    def editfast_hparams(self):
        """The method's editfast hyper-parameters (types and ranges checked; unknown keys named)."""
        try:
            return make_hparams(self.method, self._split()[0])
        except HParamsError as e:
            raise HParamsError(f"{type(self).__name__}: {e} (EasyEdit's "
                               f"{', '.join(OPTION_KEYS + _EDITOR_KEYS)} are read by the editor)") from None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        config = self.__dict__.get("_config", {})
        if name in config:
            return config[name]
        if name in self.defaults:
            return self.defaults[name]
        hp = self.editfast_hparams()  # a key the file leaves out: editfast's default
        if name in getattr(hp, "__dataclass_fields__", {}):
            return getattr(hp, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        self._config[name] = value

    def to_dict(self) -> dict[str, Any]:
        return {**self.defaults, **self._config, "alg_name": self.alg_name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


class ROMEHyperParams(HyperParams):
    alg_name = "ROME"


class MEMITHyperParams(HyperParams):
    alg_name = "MEMIT"


class AlphaEditHyperParams(HyperParams):
    alg_name = "AlphaEdit"


class EMMETHyperParams(HyperParams):
    alg_name = "EMMET"


class R_ROMEHyperParams(HyperParams):  # noqa: N801 (EasyEdit's name)
    alg_name = "R-ROME"


class GraceHyperParams(HyperParams):
    alg_name = "GRACE"


class WISEHyperParams(HyperParams):
    alg_name = "WISE"


# --------------------------------------------------------------------------- requests


def _as_list(x: Any, n: int, what: str, wrap: bool = True) -> list:
    """EasyEdit's broadcasting of one value (``wrap``: a string or None) to a list of one, with the
    length checked."""
    if wrap and (isinstance(x, str) or x is None):
        x = [x]
    if not isinstance(x, (list, tuple)):
        raise RequestError(f"{what} must be a list{' or a string' if wrap else ''}, not {type(x).__name__}")
    if len(x) != n:
        raise RequestError(f"{what} has {len(x)} entries for {n} prompts; give one per prompt")
    return list(x)


def _group(prompt: Any, truth: Any, where: str) -> None:
    """A locality/portability entry: one prompt and its answer, or equal-length lists of them."""
    if isinstance(prompt, str) and isinstance(truth, str):
        return
    if (isinstance(prompt, list) and isinstance(truth, list) and len(prompt) == len(truth) and prompt
            and all(isinstance(p, str) for p in prompt) and all(isinstance(t, str) for t in truth)):
        return
    raise RequestError(f"{where}: 'prompt' and 'ground_truth' must be two strings or two lists of strings of one "
                       f"length, got {type(prompt).__name__} and {type(truth).__name__}")


def prepare_requests(prompts, target_new, ground_truth=None, target_neg=None, rephrase_prompts=None,
                     locality_inputs=None, portability_inputs=None, subject=None) -> list[dict[str, Any]]:
    """EasyEdit's request dicts (``_prepare_requests``), every input checked before any work."""
    if isinstance(prompts, str):
        prompts, target_new = [prompts], [target_new]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise RequestError("prompts must be a string or a non-empty list of strings")
    n = len(prompts)
    target_new = _as_list(target_new, n, "target_new")
    requests = [{"prompt": p, "target_new": t, "ground_truth": g, "portability": {}, "locality": {}}
                for p, t, g in zip(prompts, target_new,
                                   [None] * n if ground_truth is None else _as_list(ground_truth, n, "ground_truth"))]
    for i, r in enumerate(requests):
        for key in ("prompt", "target_new"):
            if not isinstance(r[key], str) or not r[key].strip():
                raise RequestError(f"edit {i}: {key} must be a non-empty string, got {r[key]!r}")
    if target_neg is not None:
        for r, t in zip(requests, _as_list(target_neg, n, "target_neg")):
            r["target_neg"] = t
    if subject is None:
        raise RequestError("subject= is required: the subject of each prompt, which ROME-style methods locate")
    for i, (r, s) in enumerate(zip(requests, _as_list(subject, n, "subject"))):
        if not isinstance(s, str) or not s.strip() or s not in r["prompt"]:
            raise RequestError(f"edit {i}: subject {s!r} does not occur in the prompt {r['prompt']!r}")
        r["subject"] = s
    if rephrase_prompts is not None:
        for i, (r, p) in enumerate(zip(requests, _as_list(rephrase_prompts, n, "rephrase_prompts"))):
            if not isinstance(p, str):
                raise RequestError(f"edit {i}: a rephrase prompt must be a string, got {type(p).__name__}")
            r["rephrase_prompt"] = p
    for section, inputs in (("locality", locality_inputs), ("portability", portability_inputs)):
        if inputs is None:
            continue
        if not isinstance(inputs, Mapping):
            raise RequestError(f"{section}_inputs must be a dict {{name: {{'prompt': ..., 'ground_truth': ...}}}}")
        for key, spec in inputs.items():
            if not isinstance(spec, Mapping) or set(spec) != {"prompt", "ground_truth"}:
                raise RequestError(f"{section}_inputs[{key!r}] must be a dict with exactly 'prompt' and 'ground_truth'")
            ps, ts = spec["prompt"], spec["ground_truth"]
            if isinstance(ps, str):
                ps, ts = [ps], [ts]
            ps = _as_list(ps, n, f"{section}_inputs[{key!r}]['prompt']", wrap=False)
            ts = _as_list(ts, n, f"{section}_inputs[{key!r}]['ground_truth']", wrap=False)
            for i, (r, p, t) in enumerate(zip(requests, ps, ts)):
                if p is not None:
                    _group(p, t, f"{section}_inputs[{key!r}] of edit {i}")
                    r[section][key] = {"prompt": p, "ground_truth": t}
    return requests


def _check_request_dicts(requests: Any) -> list[dict[str, Any]]:
    """Request dicts given as ``requests=`` (EasyEdit's own format), checked like built ones."""
    if not isinstance(requests, list) or not requests or not all(isinstance(r, Mapping) for r in requests):
        raise RequestError("requests= must be a non-empty list of EasyEdit request dicts")
    out = []
    for r in requests:
        built = prepare_requests(
            [r.get("prompt")], [r.get("target_new")], [r.get("ground_truth")], r.get("target_neg"),
            [r["rephrase_prompt"]] if "rephrase_prompt" in r else None,
            {k: {kk: [vv] for kk, vv in v.items()} for k, v in (r.get("locality") or {}).items()},
            {k: {kk: [vv] for kk, vv in v.items()} for k, v in (r.get("portability") or {}).items()},
            [r.get("subject")])[0]
        out.append({**r, **built})
    return out


def _editfast_request(r: dict[str, Any], case_id: int):

    return Request.from_dict({"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"],
                              "case_id": case_id})


# --------------------------------------------------------------------------- metrics


@torch.no_grad()
def predictions(lm, prompts: str | Sequence[str], targets: str | Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """EasyEdit's ``test_prediction_acc`` for one group: per (prompt, target), the model's argmax tokens
    at the positions that predict the target's tokens, and those tokens (teacher-forced). The group
    runs as one left-padded batch, as EasyEdit runs it."""
    if isinstance(prompts, str):
        prompts, targets = [prompts], [targets]
    tok, model = lm.tokenizer, lm.model
    texts = [p + " " + t for p, t in zip(prompts, targets)]
    ids = tok(texts)["input_ids"]
    n_prompt = [len(x) for x in tok(list(prompts))["input_ids"]]
    width = max(map(len, ids))
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=lm.device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=lm.device)
    argmax = model(input_ids=input_ids, attention_mask=mask).logits.argmax(-1).tolist()
    out = []
    for row, labels, x, m in zip(argmax, input_ids.tolist(), ids, n_prompt):
        start = width - len(x) + m  # the target's first position (EasyEdit: pads + the prompt's tokens)
        out.append((row[start - 1: -1], labels[start:]))
    return out


def _acc(pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    return [sum(a == b for a, b in zip(ans, lab)) / len(lab) for ans, lab in pairs if lab]


def edit_quality(lm, request: dict[str, Any]) -> dict[str, Any]:
    """EasyEdit's ``compute_edit_quality`` (its default, teacher-forced path) for one request."""
    ret: dict[str, Any] = {"rewrite_acc": _acc(predictions(lm, request["prompt"], request["target_new"])),
                           "metric_meta": {"rewrite": {"result_key": "rewrite_acc", **_LM_META}},
                           "locality": {}, "portability": {}}
    if "rephrase_prompt" in request:
        ret["rephrase_acc"] = _acc(predictions(lm, request["rephrase_prompt"], request["target_new"]))
        ret["metric_meta"]["rephrase"] = {"result_key": "rephrase_acc", **_LM_META}
    for key, x in request.get("locality", {}).items():
        ret["locality"][f"{key}_output"] = [ans for ans, _ in predictions(lm, x["prompt"], x["ground_truth"])]
    for key, x in request.get("portability", {}).items():
        ret["portability"][f"{key}_acc"] = _acc(predictions(lm, x["prompt"], x["ground_truth"]))
    return ret


def finalize_locality(metric: dict[str, Any], request: dict[str, Any]) -> None:
    """``post.locality.KEY_acc``: per locality prompt, the share of the post-edit argmax tokens equal to
    the pre-edit ones (EasyEdit's ``finalize_locality_metrics``)."""
    for key in request.get("locality", {}):
        pre, post = metric["pre"]["locality"][f"{key}_output"], metric["post"]["locality"][f"{key}_output"]
        metric["post"]["locality"][f"{key}_acc"] = [sum(a == b for a, b in zip(x, y)) / len(x) if x else float("nan")
                                                    for x, y in zip(pre, post)]
        metric["post"]["metric_meta"][f"locality.{key}"] = {"result_key": f"locality.{key}_acc", **_LOCALITY_META}


def summary_metrics(all_metrics: dict | list[dict]) -> dict[str, Any]:
    """EasyEdit's summary: per phase the mean ``rewrite_acc``/``rephrase_acc`` and the mean of every
    ``locality``/``portability`` ``*_acc``; printed as EasyEdit prints it, and returned."""
    if isinstance(all_metrics, dict):
        all_metrics = [all_metrics]

    def mean(xs):
        xs = [float(sum(x) / len(x)) if isinstance(x, list) else float(x) for x in xs if x != []]
        return sum(xs) / len(xs)

    out: dict[str, Any] = {}
    for phase in ("pre", "post"):
        out[phase] = {}
        for key in ("rewrite_acc", "rephrase_acc"):
            values = [m[phase][key] for m in all_metrics if key in m.get(phase, {})]
            if values:
                out[phase][key] = mean(values)
        for section in ("locality", "portability"):
            keys = sorted({k for m in all_metrics for k in m.get(phase, {}).get(section, {}) if k.endswith("acc")})
            if keys:
                out[phase][section] = {k: mean([m[phase][section][k] for m in all_metrics
                                                if k in m.get(phase, {}).get(section, {})]) for k in keys}
    print("Metrics Summary: ", out)
    return out


# --------------------------------------------------------------------------- the editor


def _device(value: str | None) -> str:
    """``split_options``' device (the file's integer N is "cuda:N"; a string "N" reads the same); without
    CUDA, the CPU with a warning."""
    if value is None:
        return "cpu"
    if value.isdigit():
        value = f"cuda:{value}"
    if value.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"hparams device {value!r}: CUDA is not available, using the CPU", stacklevel=4)
        return "cpu"
    return value


class BaseEditor:
    """EasyEdit's ``BaseEditor`` for ROME, MEMIT, AlphaEdit, EMMET and r-ROME, on editfast's methods."""

    @classmethod
    def from_hparams(cls, hparams: HyperParams) -> BaseEditor:
        return cls(hparams)

    def __init__(self, hparams: HyperParams):

        if not isinstance(hparams, HyperParams):
            raise HParamsError("BaseEditor needs hyper-parameters from editfast.easyedit (e.g. "
                               f"ROMEHyperParams.from_hparams(path)), not {type(hparams).__name__}")
        if getattr(hparams, "model_name", None) is None:
            raise HParamsError(f"{type(hparams).__name__} has no model_name: the model to edit")
        options = hparams._split()[1]  # the bookkeeping keys as they are now, checked
        self.hparams, self.alg_name, self.model_name = hparams, hparams.alg_name, options["model"]
        self.stats_dir = options.get("stats_dir")  # None: editfast's cache ($EDITFAST_CACHE)
        self.method = get_method(hparams.method)
        self.hp = hparams.editfast_hparams()
        config = model_config(self.model_name)  # everything checked before the weights load
        adapter = adapter_for(config)
        self.hp.check_modules(adapter)
        check_layers(self.hp, int(getattr(config, adapter.n_layers_attr)))
        dtype = options.get("dtype", "float32")
        if self.method.needs_statistics(self.hp):
            with stats_location(self.stats_dir):
                check_corpus(self.hp, dtype)
        device = "auto" if options.get("device_map") else _device(options.get("device"))  # model_parallel: true
        self.lm = load_model(self.model_name, dtype=dtype, device=device)
        self.model, self.tok, self.device = self.lm.model, self.lm.tokenizer, self.lm.device
        self.sites = self.method.sites(self.lm, self.hp)
        self._state = self._templates = None

    # ------------------------------------------------------------------ EasyEdit's entry points
    def edit(self, prompts, target_new, ground_truth=None, target_neg=None, rephrase_prompts=None,
             locality_inputs=None, portability_inputs=None, sequential_edit=False, verbose=True, **kwargs):
        """Edit one request at a time (EasyEdit's ``edit``): every request's ``pre`` on the unedited
        model first, then per request: edit, ``post``, and (unless ``sequential_edit``) restore."""
        if getattr(self.hparams, "batch_size", 1) != 1:
            raise HParamsError(f"edit() edits one request at a time: hparams batch_size is {self.hparams.batch_size}; "
                               "set it to 1 or call batch_edit()")
        requests, opts = self._requests("edit", prompts, target_new, ground_truth, target_neg, rephrase_prompts,
                                        locality_inputs, portability_inputs, sequential_edit, kwargs)
        if opts["pre_edit"] is not None:
            pre = opts["pre_edit"]
            if not (isinstance(pre, list) and len(pre) == len(requests)
                    and all(isinstance(m, dict) and "pre" in m for m in pre)):
                raise RequestError(f"pre_edit must be a list of {len(requests)} metrics dicts (one per request)")
            all_metrics = opts["pre_edit"]
        else:
            all_metrics = [{"pre": edit_quality(self.lm, r)} for r in requests]
            if opts["pre_file"] is not None:

                write_json(opts["pre_file"], all_metrics)
        weights_copy = None
        with self._transaction(verbose):
            for i, r in enumerate(requests):
                all_metrics[i].update({"case_id": i, "requested_rewrite": r})
                weights_copy = self._apply([r], i, sequential_edit, verbose, [all_metrics[i]], timed=False)
                finalize_locality(all_metrics[i], r)
                if verbose:
                    LOG.info("%d editing: %s -> %s\n%s", i, r["prompt"], r["target_new"], all_metrics[i])
        if verbose:
            summary_metrics(all_metrics)
        return all_metrics, self.model, weights_copy

    def batch_edit(self, prompts, target_new, ground_truth=None, target_neg=None, rephrase_prompts=None,
                   locality_inputs=None, portability_inputs=None, sequential_edit=False, verbose=True, **kwargs):
        """Edit in batches of ``hparams.batch_size`` (EasyEdit's ``batch_edit``): per batch, ``pre`` on
        the model as it is, one batched edit, ``post``, and (unless ``sequential_edit``) restore."""
        if not self.method.batchable:
            batchable = [m.easyedit_alg for m in METHODS.values() if m.easyedit_alg and m.batchable]
            raise EditfastError(f"The Method {self.alg_name} can not batch edit examples (EasyEdit batches "
                                f"{', '.join(batchable)} of the methods here)")
        size = self.hparams.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise HParamsError(f"hparams batch_size must be a positive integer, got {size!r}")
        requests, _ = self._requests("batch_edit", prompts, target_new, ground_truth, target_neg, rephrase_prompts,
                                     locality_inputs, portability_inputs, sequential_edit, kwargs)
        all_metrics: list[dict[str, Any]] = []
        weights_copy = None
        with self._transaction(verbose):
            for s in range(0, len(requests), size):
                chunk = requests[s: s + size]
                metrics = [{"case_id": i, "requested_rewrite": r, "pre": edit_quality(self.lm, r)}
                           for i, r in enumerate(chunk)]
                weights_copy = self._apply(chunk, s, sequential_edit, verbose, metrics, timed=True)
                for m, r in zip(metrics, chunk):
                    finalize_locality(m, r)
                    if verbose:
                        LOG.info("%d editing: %s -> %s\n%s", m["case_id"], r["prompt"], r["target_new"], m)
                all_metrics += metrics
        return all_metrics, self.model, weights_copy

    def generate_edit(self, *args, **kwargs):
        raise EditfastError("generate_edit (chat-template generation) is not supported by editfast.easyedit")

    def normal_edit(self, *args, **kwargs):
        raise EditfastError("normal_edit is not supported by editfast.easyedit; use batch_edit")

    def deep_edit(self, *args, **kwargs):
        raise EditfastError("deep_edit (DeepEdit's API) is not supported by editfast.easyedit")

    # ------------------------------------------------------------------ internals
    _KNOWN = {"subject": None, "keep_original_weight": None, "test_generation": False, "eval_metric": "exact match",
              "train_ds": None, "requests": None, "pre_edit": None, "pre_file": None}

    def _requests(self, where, prompts, target_new, ground_truth, target_neg, rephrase_prompts, locality_inputs,
                  portability_inputs, sequential_edit, kwargs) -> tuple[list[dict], dict]:
        unknown = sorted(set(kwargs) - set(self._KNOWN))
        if unknown:
            raise RequestError(f"{where}: unknown or unsupported argument(s) {', '.join(unknown)} (editfast.easyedit "
                               f"takes {', '.join(sorted(self._KNOWN))} besides the named ones)")
        opts = {**self._KNOWN, **kwargs}
        if where == "batch_edit":
            for k in ("requests", "pre_edit", "pre_file"):
                if opts[k] is not None:
                    raise RequestError(f"batch_edit: {k}= is an argument of edit() only")
        if opts["test_generation"]:
            raise RequestError("test_generation=True (fluency of generated text) is not supported by editfast.easyedit")
        if opts["eval_metric"] not in _TOKEN_METRICS:
            raise RequestError(f"eval_metric={opts['eval_metric']!r} is not supported by editfast.easyedit; only "
                               "EasyEdit's default token accuracy ('exact match')")
        if opts["train_ds"] is not None:
            raise RequestError("train_ds= is used by IKE only, which editfast.easyedit does not run")
        if not isinstance(sequential_edit, bool):
            raise RequestError(f"sequential_edit must be True or False, got {sequential_edit!r}")
        keep = opts["keep_original_weight"]
        if keep is not None and not isinstance(keep, bool):
            raise RequestError(f"keep_original_weight must be True or False, got {keep!r}")
        if keep and sequential_edit:
            raise RequestError("keep_original_weight=True (restore after each edit) contradicts sequential_edit=True")
        if keep is False and not sequential_edit:
            warnings.warn("keep_original_weight=False: EasyEdit no longer has this parameter and restores the weights "
                          "after each edit unless sequential_edit=True (before mid-2024 it kept the edits); "
                          "the weights are restored after each edit", stacklevel=3)
        if opts["requests"] is not None:
            requests = _check_request_dicts(opts["requests"])
        else:
            if isinstance(prompts, (list, tuple)) and not isinstance(target_new, (list, tuple)):
                raise RequestError("prompts is a list, target_new is not: give one target per prompt")
            requests = prepare_requests(prompts, target_new, ground_truth, target_neg, rephrase_prompts,
                                        locality_inputs, portability_inputs, opts["subject"])
        self._check_lengths(requests)
        return requests, opts

    def _check_lengths(self, requests: list[dict]) -> None:

        reqs = [_editfast_request(r, i) for i, r in enumerate(requests)]
        for r in reqs:
            validate_requests([r])
        check_lengths(self.lm, reqs)

    def _prepare(self, verbose: bool) -> None:
        if self._state is None:
            self._templates = self.method.templates(self.lm, self.hp, seed=42)  # EasyEdit seeds 42

            with stats_location(self.stats_dir):  # the file's stats_dir, as the CLI's edit honours it
                self._state = self.method.prepare(self.lm, self.hp, progress=verbose)

    @contextmanager
    def _transaction(self, verbose: bool):
        """On any failure, the weights and the method's state as they were before the call."""

        self._sync()
        self._prepare(verbose)
        saved_state = dict(self._state.tensors)
        try:
            with guard(self.lm, self.sites):
                yield
        except BaseException:
            self._state.tensors.clear()
            self._state.tensors.update(saved_state)
            self.method.install(self.lm, self.hp, self._state)  # a routed method's memory as it was
            raise

    def _sync(self) -> None:
        """Take hyper-parameters changed on ``self.hparams`` since the last call (EasyEdit reads them at
        each call): checked against the model, and the method's state prepared again."""

        hp = self.hparams.editfast_hparams()
        if hp.to_dict() == self.hp.to_dict():
            return
        hp.check_modules(self.lm.adapter)
        check_layers(hp, self.lm.adapter.num_layers(self.model))
        self.hp, self.sites = hp, self.method.sites(self.lm, hp)
        self._state = self._templates = None

    def _apply(self, chunk: list[dict], start: int, sequential: bool, verbose: bool, metrics: list[dict],
               timed: bool) -> dict[str, torch.Tensor]:
        """Edit ``chunk`` as one batch, put each request's ``post`` (and with ``timed`` the batch's editing
        seconds as ``time``) into ``metrics``, then restore the weights and the method's state unless
        ``sequential``. Returns EasyEdit's weights_copy: the changed weights as they were before."""

        reqs = [_editfast_request(r, start + i) for i, r in enumerate(chunk)]
        before = snapshot(self.lm, self.sites)
        saved_state = dict(self._state.tensors)
        t = time.perf_counter()
        ups = edit_batch(self.lm, self.method, reqs, self.hp, self._state, self._templates, backend="fast",
                         progress=verbose)
        seconds = time.perf_counter() - t
        self._state.take_changed()
        self.method.install(self.lm, self.hp, self._state)  # a routed method's memory (GRACE, WISE): evaluated next
        changed = {u.weight for u in ups}
        weights_copy = {name: w for name, w in before.items() if name in changed}
        for m, r in zip(metrics, chunk):
            if timed:
                m["time"] = seconds
            m["post"] = edit_quality(self.lm, r)
        if not sequential:
            restore(self.lm, before)
            self._state.tensors.clear()
            self._state.tensors.update(saved_state)
            self.method.install(self.lm, self.hp, self._state)
        return weights_copy


__all__ = ["BaseEditor", "HyperParams", "ROMEHyperParams", "MEMITHyperParams", "AlphaEditHyperParams",
           "EMMETHyperParams", "R_ROMEHyperParams", "GraceHyperParams", "WISEHyperParams", "summary_metrics",
           "prepare_requests", "edit_quality", "predictions"]
