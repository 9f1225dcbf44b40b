"""lm-evaluation-harness model backed by editfast's batched engine.

    import editfast.harness                     # registers the model as "editfast"
    lm_eval.simple_evaluate(model="editfast", model_args="model=smollm2-135m,edits=runs/memit-10",
                            tasks=["hellaswag"])
    python -m editfast.harness run --model editfast --model_args model=smollm2-135m --tasks hellaswag

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

import sys
from pathlib import Path

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
from editfast.engine.engine import Engine
from editfast.engine.requests import Generate, LogLik, Rolling
from editfast.models.load import load_model
from editfast.session.journal import load_run
from editfast.session.session import apply_entries

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


class EditfastLM(LM):
    """An lm-eval model on editfast's engine.

    model_args (``lm_eval --model_args k=v,...``): ``model`` (a spec ``editfast.load_model``
    takes: HF directory, .gguf, ``smollm2-135m``, ``random:<preset>``; default: the model of
    ``edits``' run, else ``smollm2-135m``), ``dtype`` (float32), ``device`` (cpu), ``edits`` (an
    ``editfast edit`` run directory whose edits are applied), ``batch_tokens`` (the engine's
    token budget per batch, or ``auto``), ``max_length`` (the context window; default the
    model's, at most 2048), ``progress``. lm-eval's ``batch_size``/``max_batch_size`` are accepted
    and not used: the engine batches by tokens. ``lm=`` takes an already loaded
    ``editfast.load_model`` result (Python only).
    """

    def __init__(self, model: str | None = None, dtype: str = "float32", device: str | None = None,
                 edits: str | Path | None = None, batch_tokens: int | str = "auto", max_length: int | None = None,
                 progress: bool | str = False, lm=None, batch_size=None, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise EditfastError(f"editfast model: unknown model_args {', '.join(sorted(unknown))} (valid: model, "
                                "dtype, device, edits, batch_tokens, max_length, progress)")

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


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``editfast`` model registered; editfast's errors (a bad run
    directory, an unknown model) are one line on stderr and exit code 2."""
    from lm_eval.__main__ import cli_evaluate  # optional dependency (the harness extra)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv[0] = "lm-eval"
    try:
        cli_evaluate()
    except EditfastError as e:
        print(f"editfast: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
