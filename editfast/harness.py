"""lm-evaluation-harness model backed by editfast's batched engine.

    import editfast.harness                     # registers the model as "editfast"
    lm_eval.simple_evaluate(model="editfast", model_args="pretrained=smollm2-135m,edits=runs/memit-10",
                            tasks=["editfast_rte"], task_manager=editfast.harness.task_manager())
    python -m editfast.harness run --model editfast --model_args pretrained=smollm2-135m --tasks editfast_rte

``TASKS_DIR`` holds lm-eval task files of editfast's bundled tasks (``editfast_rte``,
``editfast_sst2``), which run offline; ``task_manager()`` is lm-eval's TaskManager with them, and
``python -m editfast.harness`` adds them to lm-eval's ``--include_path``.

``EditfastLM`` answers lm-eval's three request kinds with ``editfast.engine.engine.Engine``:
``loglikelihood`` (contexts run once and KV-cached, their continuations scored against the cache),
``loglikelihood_rolling`` (lm-eval's rolling windows) and ``generate_until`` (batched greedy
decoding; lm-eval's stop handling: the EOS text joins ``until`` and the text is cut at the first
stop string). ``edits=RUN_DIR`` replays an ``editfast edit`` run's journal onto the base model
after validating it whole (model fingerprint, every update's weight and shape).

lm-eval's command line imports no plugins, so ``lm_eval --model editfast`` cannot find the model
by itself: ``python -m editfast.harness ARGS`` imports this module and then runs lm-eval's command
line with ARGS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

try:
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models first: get_model() skips its

    #                                     lazy registration once the registry holds any model)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.models.utils import (
        handle_stop_sequences,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
except ImportError:  # pragma: no cover - depends on the environment
    from editfast.core.errors import EditfastError

    raise EditfastError("editfast.harness needs lm-evaluation-harness: pip install 'editfast[harness]'") from None

from editfast.core.errors import EditfastError
from editfast.core.paths import PACKAGE_DATA
from editfast.engine.engine import Engine
from editfast.engine.requests import Generate, LogLik, Rolling
from editfast.models.load import load_model, model_config
from editfast.session.journal import load_run
from editfast.session.session import apply_entries

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until
TASKS_DIR = PACKAGE_DATA / "lm_eval"  # lm-eval task files of editfast's bundled tasks (offline)
MODEL_ARGS = ("pretrained", "model", "dtype", "device", "edits", "batch_tokens", "max_length", "progress")
IGNORED_ARGS = ("batch_size", "max_batch_size")  # lm-eval's; the engine batches by tokens
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # what load_model takes


def task_manager(include_path: str | Path | list | None = None, include_defaults: bool = True):
    """lm-eval's TaskManager with editfast's bundled task files (``editfast_rte``, ``editfast_sst2``)
    beside ``include_path``'s and (``include_defaults``) lm-eval's own, whose index takes seconds."""
    from lm_eval.tasks import TaskManager  # optional dependency (the harness extra)

    extra = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else include_path
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra)], include_defaults=include_defaults)


def check_model_args(args: dict) -> dict:
    """``EditfastLM``'s model_args checked without loading anything (unknown keys, ``pretrained`` and
    ``model`` that disagree, a model spec that cannot load, an ``edits`` folder that is not an edit
    run, a dtype, batch_tokens or max_length that is not one), EditfastError naming what is wrong.
    Returns the arguments with ``pretrained`` (lm-eval's usual name) given as ``model``."""
    args = dict(args)
    unknown = sorted(set(args) - set(MODEL_ARGS) - set(IGNORED_ARGS) - {"lm"})
    if unknown:
        raise EditfastError(f"editfast model: unknown model_args {', '.join(unknown)} (valid: "
                            f"{', '.join(MODEL_ARGS)})")
    pretrained = args.pop("pretrained", None)
    if pretrained is not None and args.get("model") not in (None, pretrained):
        raise EditfastError(f"editfast model: pretrained={pretrained} and model={args['model']} name two models; "
                            "give one")
    if pretrained is not None:
        args["model"] = pretrained
    dtype = args.get("dtype")
    if dtype is not None and not isinstance(dtype, torch.dtype) and str(dtype) not in DTYPE_NAMES:
        raise EditfastError(f"editfast model: dtype={args['dtype']}: use float32, bfloat16 or float16")
    for key in ("batch_tokens", "max_length"):
        v = args.get(key)
        if v is not None and not (key == "batch_tokens" and v == "auto"):
            try:
                ok = int(v) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise EditfastError(f"editfast model: {key}={v} must be a positive number"
                                    + (" or auto" if key == "batch_tokens" else ""))
    config = load_run(args["edits"])[0] if args.get("edits") is not None else None
    if args.get("lm") is None:
        model_config(args.get("model") or (config or {}).get("model") or "smollm2-135m")  # ModelError if unknown
    return args


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


class EditfastLM(LM):
    """An lm-eval model on editfast's engine.

    model_args (``lm_eval --model_args k=v,...``): ``pretrained`` or ``model`` (a spec
    ``editfast.load_model`` takes: HF directory, .gguf, ``smollm2-135m``, ``random:<preset>``, a Hub
    id in the local cache; default: the model of ``edits``' run, else ``smollm2-135m``), ``dtype`` (float32), ``device`` (cpu), ``edits`` (an
    ``editfast edit`` run directory whose edits are applied), ``batch_tokens`` (the engine's
    token budget per batch, or ``auto``), ``max_length`` (the context window; default the
    model's, at most 2048), ``progress``. lm-eval's ``batch_size``/``max_batch_size`` are accepted
    and not used: the engine batches by tokens. ``lm=`` takes an already loaded
    ``editfast.load_model`` result (Python only).
    """

    def __init__(self, model: str | None = None, dtype: str = "float32", device: str | None = None,
                 edits: str | Path | None = None, batch_tokens: int | str = "auto", max_length: int | None = None,
                 progress: bool | str = False, lm=None, batch_size=None, max_batch_size=None, **more):
        super().__init__()
        model = check_model_args({"model": model, "dtype": dtype, "edits": edits, "batch_tokens": batch_tokens,
                                  "max_length": max_length, "lm": lm, **more})["model"]
        config = None
        if edits is not None:

            config = load_run(edits)[0]  # the run's files, whole, before the model loads
        if lm is None:
            spec = model or (config or {}).get("model") or "smollm2-135m"
            lm = load_model(spec, dtype=dtype, device=device or "cpu")
        if edits is not None:
            apply_entries(lm, *load_run(edits, lm))  # names, shapes, fingerprint checked first
        self.lm, self.edits = lm, None if edits is None else str(edits)
        if batch_tokens != "auto":
            batch_tokens = int(batch_tokens)
        self.engine = Engine(lm, batch_tokens=batch_tokens, max_length=int(max_length) if max_length else None,
                             progress=_bool(progress))
        self._device = lm.device

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "EditfastLM":
        """lm-eval's constructor path: its --device/--batch_size fill in what model_args do not give
        (lm-eval passes both, so ``device=`` in model_args would otherwise be given twice)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if str(extra.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
            del extra["device"]  # lm-eval's default cuda:0 on a machine without CUDA: the CPU
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "EditfastLM":
        from lm_eval.utils import simple_parse_args_string  # optional dependency (the harness extra)

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- lm-eval's interface ----------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = self.engine.loglikelihood([LogLik(*r.args) for r in requests])
        return [(o.logprob, o.is_greedy) for o in out]

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [o.logprob for o in self.engine.rolling([Rolling(r.args[0]) for r in requests])]

    def generate_until(self, requests) -> list[str]:
        eos = self.lm.tokenizer.decode([self.lm.tokenizer.eos_token_id], skip_special_tokens=False) \
            if self.lm.tokenizer.eos_token_id is not None else None
        gens, stops = [], []
        for r in requests:
            context, gen_kwargs = r.args
            kw = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
            if kw.get("do_sample"):
                raise EditfastError("editfast model: only greedy generation (do_sample=False)")
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            n = int(kw.pop("max_gen_toks"))
            if n >= self.engine.max_length:
                raise EditfastError(f"editfast model: max_gen_toks {n} must be below the context window "
                                    f"{self.engine.max_length}")
            gens.append(Generate(context, n, tuple(s for s in until if s)))
            stops.append(until)
        # the engine cuts at a stop string after any leading whitespace; lm-eval cuts at the first
        # one anywhere: cutting the engine's text again gives lm-eval's answer
        return [postprocess_generated_text(text, until, None)
                for text, until in zip(self.engine.generate(gens), stops)]

    # -- what lm-eval records about the model ------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.lm.tokenizer, "name_or_path", "") or self.lm.spec).replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_spec": self.lm.spec, "model_fingerprint": self.lm.fingerprint, "edits": self.edits,
                "dtype": str(self.lm.dtype).replace("torch.", ""), "batch_tokens": self.engine.batch_tokens,
                "max_length": self.engine.max_length}


if "editfast" not in model_registry:  # once, also when this file also runs as __main__
    register_model("editfast")(EditfastLM)


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in ``argv`` (the last one), else None."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def parse_model_args(text: str) -> dict:
    """lm-eval's model_args: a JSON object, or ``k=v,k=v`` (lm-eval's simple_parse_args_string)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            args = json.loads(text)
        except ValueError as e:
            raise EditfastError(f"--model_args {text}: not a JSON object ({e})") from None
        if not isinstance(args, dict):
            raise EditfastError(f"--model_args {text}: not a JSON object")
        return args
    args = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise EditfastError(f"--model_args: {part!r} is not key=value")
        args[key.strip()] = value.strip()
    return args


def precheck(argv: list[str]) -> list[str]:
    """Before lm-eval's slow start-up (its task index): with ``--model editfast``, its model_args
    (``check_model_args``); and editfast's task files added to ``--include_path``. Returns argv."""
    if argv and argv[0] != "run" and not argv[0].startswith("-"):
        return argv  # another lm-eval subcommand (ls, validate): as it is
    if _option(argv, "--model") == "editfast":
        check_model_args(parse_model_args(_option(argv, "--model_args") or ""))
    include = _option(argv, "--include_path")
    if include is None:
        return [*argv, "--include_path", str(TASKS_DIR)]
    return argv


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``editfast`` model registered and editfast's task files on
    its include path; editfast's errors (unknown model_args, an unknown model, a bad run directory)
    are one line on stderr and exit code 2, before lm-eval indexes its tasks where they can be."""
    from lm_eval.__main__ import cli_evaluate  # optional dependency (the harness extra)

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        sys.argv = ["lm-eval", *precheck(argv)]
        cli_evaluate()
    except EditfastError as e:
        print(f"editfast: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
