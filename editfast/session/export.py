"""Exports of an edit run: a PEFT LoRA adapter of its journal, and the model card of a saved model.

    lora_from_run("runs/memit-10", "adapters/memit-10")          # editfast export RUN --lora DIR
    model = peft.AutoPeftModelForCausalLM.from_pretrained("adapters/memit-10")   # = the edited model
    export_base("random:tiny-llama", "base/tiny-llama")          # editfast export-base MODEL DIR

A run's journal already is a LoRA: every update is ΔW = U Vᵀ on one named weight (``update.py``),
and the edited weight is W₀ + Σ ΔW. For each edited module the adapter holds one LoRA whose
factors are the journal's concatenated, B = [U₁ U₂ …] ([out, r]) and A = [V₁ V₂ …]ᵀ ([r, in]), so
B A = Σ Uᵢ Vᵢᵀ exactly. PEFT scales B A by lora_alpha / r; lora_alpha = r makes it 1.

- Updates that are not low rank (KN's neuron updates and RECT's sparsified ones are Sparse;
  ``--norm-anchor``, AlphaEdit's reference backend and UltraEdit's primal solve are Dense) are
  summed per module and factorised exactly by an SVD in float64, keeping every singular value
  above float64's noise (σ > σ₁·max(out, in)·ε₆₄): a KN update comes out rank 1, a dense update
  generally full rank (rank min(out, in)).
- A module whose concatenated rank would exceed min(out, in) is refactorised the same way (its
  ΔW summed in float64, then the SVD): never larger than the matrix it changes.
- Every module gets the adapter's one rank r (the largest; the others padded with zero columns),
  because vLLM reads one ``r`` per adapter and ignores PEFT's ``rank_pattern``.
- Each rank-one pair is balanced (‖Bⱼ‖ = ‖Aⱼ‖, an exact rescaling) before the cast to the
  adapter's dtype, so float16/bfloat16 adapters do not overflow where the factors' scales differ.
- ``target_modules`` lists the edited modules' full paths: PEFT matches a name exactly or as a
  dotted suffix, so the adapter wraps only the edited layers. GPT-2's Conv1D (stored [in, out])
  gets ``fan_in_fan_out: true``; the factors stay in the logical [out, in] orientation.
- The adapter refers to the run's base model: it is loaded (``--model``, else the run's own spec)
  and checked against the run's fingerprint, so an adapter is never written for another model.
  ``base_model_name_or_path`` (and the card's ``base_model``) is what transformers loads offline:
  a Hub id as it is, else the base's folder in Hugging Face layout (a model directory, smollm2-135m's
  conversion in the cache, or ``--base DIR`` written by ``export_base``), so
  ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` is the edited model. A base without
  such a folder (a ``random:`` preset, a .gguf file) keeps its spec, with a warning saying how to
  write one.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

from editfast.core.compat import VERSION as __version__
from editfast.core.errors import EditfastError, ModelError
from editfast.core.paths import normal_permissions, write_json, write_text
from editfast.data.requests import load_dataset
from editfast.methods.registry import METHODS, get_method
from editfast.models.hub import is_hub_id
from editfast.models.load import ALIASES, _dir_fingerprint, hf_folder, load_model
from editfast.models.update import LowRank, Update, weight_param
from editfast.session.journal import RESULTS_FILE, Entry, load_run
from editfast.session.outputs import OutputDir, check_apart
from editfast.session.session import requests_digest

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
BASE_META = "editfast.json"  # in a folder written by export_base: the spec and fingerprint it was written from
VLLM_MAX_LORA_RANK = 512  # the largest of vLLM's max_lora_rank choices (1, 8, 16, 32, 64, 128, 256, 320, 512)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- factors


def svd_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B [out, k], A [k, in] in float64 with B A = ``delta`` (up to float64 rounding): its SVD with
    every singular value above σ₁·max(out, in)·ε₆₄ (the numerical rank)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return delta.new_zeros((delta.shape[0], 0), dtype=torch.float64), delta.new_zeros((0, delta.shape[1]),
                                                                                        dtype=torch.float64)
    k = int((S > S[0] * max(delta.shape) * torch.finfo(torch.float64).eps).sum())
    return U[:, :k] * S[:k], Vh[:k]


def module_factors(updates: Sequence[Update]) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's LoRA factors in float64: B [out, r], A [r, in] with B A = Σ ΔW of ``updates``
    (each in the logical [out, in] layout). Low-rank updates are concatenated, the others summed
    and factorised by an SVD; a total rank above min(out, in) is refactorised the same way."""
    Bs = [u.U.double() for u in updates if isinstance(u, LowRank)]
    As = [u.V.double().T for u in updates if isinstance(u, LowRank)]
    rest = [u for u in updates if not isinstance(u, LowRank)]
    if rest:
        B, A = svd_factors(sum(u.dense().double() for u in rest))
        Bs.append(B)
        As.append(A)
    B, A = torch.cat(Bs, 1), torch.cat(As, 0)
    if B.shape[1] > min(B.shape[0], A.shape[1]):
        B, A = svd_factors(B @ A)
    return B, A


def balanced(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B diag(c), diag(c)⁻¹ A with cⱼ = sqrt(‖Aⱼ‖ / ‖Bⱼ‖): the same product, each pair's norms
    equal."""
    nb, na = B.norm(dim=0), A.norm(dim=1)
    c = torch.where((nb > 0) & (na > 0), (na / nb.clamp_min(1e-300)).sqrt(), torch.ones_like(nb))
    return B * c, A / c[:, None]


def lora_tensors(lm, updates: Sequence[Update], dtype: torch.dtype = torch.float32
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's tensors (PEFT's key names) and the facts its config needs (rank, target
    modules, whether they are Conv1D) for ``updates`` on ``lm``'s model."""
    groups: dict[str, list[Update]] = {}
    for u in updates:
        groups.setdefault(u.weight, []).append(u)
    factors, conv1d = {}, set()
    for weight, ups in groups.items():
        module = weight.rsplit(".", 1)[0] if weight.endswith(".weight") else None
        owner = lm.model.get_submodule(module) if module else None
        kind = type(owner).__name__
        if owner is None or not (isinstance(owner, torch.nn.Linear) or kind == "Conv1D"):
            raise EditfastError(f"the run edits {weight}, {'a ' + kind if owner is not None else 'not a module weight'}"
                                ": a PEFT LoRA adapter holds updates of Linear and Conv1D layers only")
        if weight_param(lm.model, weight)[1]:
            conv1d.add(module)
        factors[module] = balanced(*module_factors(ups))
    r = max((B.shape[1] for B, _ in factors.values()), default=0)
    if r == 0:
        raise EditfastError("the run's edits change no weight (their sum is zero): there is no adapter to write")
    tensors, ranks = {}, {}
    for module, (B, A) in sorted(factors.items()):
        ranks[module] = B.shape[1]
        pad = r - B.shape[1]
        B, A = torch.nn.functional.pad(B, (0, pad)), torch.nn.functional.pad(A, (0, 0, 0, pad))
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.to(dtype).contiguous()
    if conv1d and len(conv1d) != len(factors):
        raise EditfastError("the run edits both Conv1D and Linear layers; one PEFT adapter has one fan_in_fan_out")
    return tensors, {"r": r, "ranks": ranks, "target_modules": sorted(factors), "fan_in_fan_out": bool(conv1d)}


def adapter_config(facts: dict[str, Any], base: str) -> dict[str, Any]:
    """adapter_config.json: a plain LoRA (no bias, no dropout, no DoRA/rsLoRA, scaling lora_alpha / r = 1)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True,
            "r": facts["r"], "lora_alpha": facts["r"], "lora_dropout": 0.0, "bias": "none",
            "target_modules": facts["target_modules"], "fan_in_fan_out": facts["fan_in_fan_out"],
            "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True}


# ---------------------------------------------------------------------------------------------- the run


def entries_up_to(run_dir: str | Path, entries: Sequence[Entry], to: int | None) -> list[Entry]:
    """The journal's batches holding the run's first ``to`` edits (all with None); a count that is
    not one of the run's batch boundaries is refused."""
    ends = [e.end for e in entries]
    if to is None:
        return list(entries)
    if to < 1:
        raise EditfastError(f"--to {to}: export at least one edit (the run {run_dir} has {ends[-1]})")
    if to > ends[-1]:
        raise EditfastError(f"--to {to} is beyond the run {run_dir}, which has {ends[-1]} edits")
    if to not in ends:
        raise EditfastError(f"--to {to} is not a batch boundary of the run {run_dir} (batches end at "
                            f"{', '.join(map(str, ends))})")
    return list(entries[: ends.index(to) + 1])


def base_model(config: dict[str, Any], model=None):
    """The run's base model, loaded (``model``: a spec or a LoadedModel; default the run's own spec)
    in the run's dtype on the CPU; a model that cannot be loaded is named with how to give it."""

    if model is not None and not isinstance(model, (str, Path)):
        return model
    spec = str(model) if model is not None else config.get("model")
    if not spec:
        raise EditfastError("the run does not name its base model: give it with --model PATH")
    try:
        return load_model(spec, dtype=str(config.get("dtype", "float32")).replace("torch.", ""))
    except ModelError as e:
        how = "check --model" if model is not None else "give it with --model PATH (the model the run was made on)"
        gone = not (spec.startswith("random:") or spec in ALIASES or Path(spec).expanduser().exists())
        why = f"{spec!r} does not exist" if gone else str(e)
        raise EditfastError(f"the run's base model is not available ({why}): {how}") from None


def lora_from_run(run_dir: str | Path, out_dir: str | Path, *, model=None, to: int | None = None,
                  dtype: str = "float32", force: bool = False, base: str | Path | None = None) -> dict[str, Any]:
    """Write a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors, README.md) of the
    run's first ``to`` edits (all by default) into ``out_dir``, a transaction: complete or absent.

    ``model``: the base model (a spec, or a LoadedModel to reuse) when the run's own spec no longer
    loads; it must be the model the run was made on (fingerprint checked). ``base``: a folder in
    Hugging Face layout holding that model (``export_base``'s), named in the adapter instead of the
    spec (see ``base_reference``). Returns a summary (rank, per-module ranks, target modules,
    edits, base_model, warnings)."""


    if dtype not in DTYPES:
        raise EditfastError(f"adapter dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    run, out = Path(run_dir), Path(out_dir).expanduser()
    check_apart(out, [run])  # before the model loads; OutputDir checks again
    config, entries = load_run(run)  # the run's files, whole, before the model loads
    method = get_method(config.get("method", ""))
    if method.routes:
        raise EditfastError(f"run {run} edited with {method.name}, which leaves the weights as they were and routes "
                            "through a memory instead: there is no weight change to export as a LoRA (save the "
                            "model with --save-model; editfast loads it with its memory)")
    keep = entries_up_to(run, entries, to)
    spec = str(config.get("model")) if model is None or not isinstance(model, (str, Path)) else str(model)
    if base is not None:  # checked before the model loads
        base_reference(spec, str(config.get("model_fingerprint")), base)
    lm = base_model(config, model)
    config, entries = load_run(run, lm)  # fingerprint, names and shapes checked against the model
    tensors, facts = lora_tensors(lm, [u for e in keep for u in e.updates], DTYPES[dtype])
    base, notes = base_reference(spec, str(config.get("model_fingerprint")), base)
    if facts["r"] > VLLM_MAX_LORA_RANK:
        notes.append(f"rank {facts['r']} exceeds {VLLM_MAX_LORA_RANK}, the largest max_lora_rank vLLM accepts: "
                     "PEFT loads it, vLLM does not (export fewer edits with --to, or merge the model)")
    for n in notes:
        warnings.warn(n, UserWarning, stacklevel=2)
    edits = keep[-1].end
    summary = {"run": str(run), "edits": edits, "batches": len(keep), "method": config.get("method"), **facts,
               "dtype": dtype, "base_model": base, "warnings": notes}
    with OutputDir(out, staged=True, force=force, inputs=[run]) as od:
        save_file(tensors, str(od.path / ADAPTER_WEIGHTS),
                  metadata={"format": "pt", "editfast_run": str(run.resolve()), "edits": str(edits)})
        write_json(od.path / ADAPTER_CONFIG, adapter_config(facts, base))
        write_text(od.path / "README.md", model_card(config, config.get("_hparams"), run_edits(run, config, edits),
                                                     base=base, adapter=facts))
        normal_permissions(od.path / ADAPTER_WEIGHTS)  # safetensors writes 0600
    return summary


def base_reference(spec: str, fingerprint: str, base: str | Path | None = None) -> tuple[str, list[str]]:
    """``base_model_name_or_path`` for a run's base model ``spec`` (weights ``fingerprint``), and the
    warnings to give: ``base`` (a folder holding that model in Hugging Face layout; checked) made
    absolute, else a Hub id as it is, else the spec's Hugging Face folder (``hf_folder``), else the
    spec itself with a warning that AutoPeftModelForCausalLM cannot load it."""
    if base is not None:
        folder = Path(base).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise EditfastError(f"--base {str(base)!r} is not a model folder in Hugging Face layout (no config.json): "
                                f"write one with 'editfast export-base {spec} DIR'")
        if fingerprint not in _folder_fingerprints(folder):
            raise EditfastError(f"--base {str(base)!r} holds another model than the run's {spec!r} (fingerprint "
                                f"{fingerprint[:12]}): write it with 'editfast export-base {spec} DIR'")
        return str(folder), []
    if is_hub_id(spec):
        return spec, []
    folder = hf_folder(spec)
    if folder is not None:
        return str(folder), []
    return spec, [(f"the base model {spec!r} has no folder in Hugging Face layout, so AutoPeftModelForCausalLM "
                   f"cannot load the adapter by itself: write one with 'editfast export-base {spec} DIR' and "
                   "export with --base DIR (PeftModel.from_pretrained(base_model, adapter) works as it is)")]


def _folder_fingerprints(folder: Path) -> set[str]:
    """The fingerprints a Hugging Face folder stands for: its own weights', and the model it was
    written from (``export_base``'s editfast.json, or smollm2-135m's conversion's GGUF)."""
    try:
        meta = json.loads((folder / BASE_META).read_text())
    except (OSError, ValueError):
        meta = {}
    named = {meta.get("model_fingerprint"), meta.get("gguf_sha256")} if isinstance(meta, dict) else set()
    own = {_dir_fingerprint(folder)} if any(folder.glob("*.safetensors")) else set()
    return {f for f in named | own if isinstance(f, str)}


def export_base(model, out_dir: str | Path, *, dtype: str = "float32", force: bool = False) -> dict[str, Any]:
    """Write the model ``model`` (a spec or a LoadedModel) into ``out_dir`` in Hugging Face layout
    (config.json, generation_config.json, model.safetensors, the tokenizer, and editfast.json naming
    the spec and fingerprint it was written from), a transaction: complete or absent.
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it; ``lora_from_run(..., base=out_dir)``
    names it in an adapter. Returns {"model", "model_fingerprint", "path"}."""
    if dtype not in DTYPES:
        raise EditfastError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if isinstance(model, (str, Path)) and Path(model).expanduser().resolve() == Path(out_dir).expanduser().resolve():
        raise EditfastError(f"{str(out_dir)!r} is the model's own folder: write it elsewhere")
    lm = model if not isinstance(model, (str, Path)) else load_model(str(model), dtype=dtype)
    meta = {"model": lm.spec, "model_fingerprint": lm.fingerprint, "dtype": dtype}
    with OutputDir(out_dir, staged=True, force=force) as od:
        lm.model.save_pretrained(od.path, safe_serialization=True)
        lm.tokenizer.save_pretrained(od.path)
        write_json(od.path / BASE_META, meta)
        normal_permissions(od.path, recursive=True)
    return {**meta, "path": str(Path(out_dir).expanduser().resolve())}


# ---------------------------------------------------------------------------------------------- model card


def run_edits(run_dir: str | Path, config: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """The run's first ``k`` requests (case_id, subject, prompt, target_true, target_new): from its
    results.json, else from its dataset when that gives the same requests, else case ids only."""
    run = Path(run_dir)
    try:
        rows = json.loads((run / RESULTS_FILE).read_text())["per_request"]
        if isinstance(rows, list) and len(rows) >= k:
            return rows[:k]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    ds = config.get("dataset") or {}
    try:

        reqs = load_dataset(ds["name"], ds["n"], offset=ds.get("offset", 0))
        if requests_digest(reqs) == config.get("requests_sha256"):
            return [{"case_id": r.case_id, "subject": r.subject, "prompt": r.prompt, "target_true": r.target_true,
                     "target_new": r.target_new} for r in reqs[:k]]
    except (EditfastError, KeyError, TypeError, OSError):
        pass
    return [{"case_id": None} for _ in range(k)]


def _cell(x: Any) -> str:
    return "" if x is None else " ".join(str(x).split()).replace("|", "\\|")


def model_card(config: dict[str, Any], hparams: dict[str, Any] | None, edits: Sequence[dict[str, Any]], *,
               base: str | None = None, adapter: dict[str, Any] | None = None) -> str:
    """README.md in Hugging Face model-card style: YAML front matter (base_model, library_name,
    tags), then the method, its hyper-parameters and every edit (subject, prompt, old -> new)."""

    base = base or str(config.get("model"))
    method = str(config.get("method"))
    q = json.dumps  # a JSON string is a YAML scalar
    front = ["---", f"base_model: {q(base)}", f"library_name: {'peft' if adapter else 'transformers'}",
             "pipeline_tag: text-generation", "tags:",
             "- editfast", "- knowledge-editing", f"- {q(method)}", "---", ""]
    what = "A PEFT LoRA adapter of" if adapter else "The model"
    n, bs, ds = len(edits), config.get("batch_size"), (config.get("dataset") or {}).get("name")
    dtype = str(config.get("dtype", "float32")).replace("torch.", "")
    body = [f"# {method} edits of {base}", "",
            f"{what} `{base}` with {n} knowledge edit{'s' * (n != 1)} made by editfast {__version__}: method "
            f"**{method}**, {bs} edit{'s' * (bs != 1)} per batch, seed {config.get('seed')}"
            + (f", dataset {_cell(ds)}" if ds else "") + f". The base model's fingerprint is "
            f"`{str(config.get('model_fingerprint'))[:12]}` ({dtype}).",
            ""]
    if not adapter and config.get("method") in METHODS and METHODS[config["method"]].routes:
        body += [(f"{method} leaves the weights as they were: the edits are a memory (`routing.json`, "
                  "`routing.safetensors`) that `editfast.load_model(DIR)` installs on the model. Plain transformers "
                  "(`AutoModelForCausalLM.from_pretrained(DIR)`) loads the base model without it, i.e. unedited."),
                 ""]
    if adapter:
        body += [f"LoRA rank {adapter['r']} on {len(adapter['target_modules'])} module(s) "
                 f"({', '.join(adapter['target_modules'])}); lora_alpha = r (scaling 1). On the base model it is "
                 "the edited model (`.merge_and_unload()`: its weights):", "",
                 "```python", "from peft import AutoPeftModelForCausalLM",
                 "model = AutoPeftModelForCausalLM.from_pretrained(ADAPTER_DIR)  # loads base_model, offline",
                 "```", ""]
    body += ["## Hyper-parameters", "", "| key | value |", "|---|---|"]
    body += [f"| {_cell(k)} | {_cell(json.dumps(v))} |" for k, v in sorted((hparams or {}).items())]
    body += ["", "## Edits", "", "| # | case | subject | prompt | old -> new |", "|---|---|---|---|---|"]
    for i, e in enumerate(edits, 1):
        prompt = e.get("prompt")
        if prompt and e.get("subject") is not None:
            prompt = prompt.replace("{}", str(e["subject"]))
        old = "?" if e.get("target_true") is None else _cell(e["target_true"])
        change = f"{old} -> {_cell(e['target_new'])}" if "target_new" in e else ""
        body.append(f"| {i} | {_cell(e.get('case_id'))} | {_cell(e.get('subject'))} | {_cell(prompt)} | {change} |")
    return "\n".join(front + body) + "\n"

