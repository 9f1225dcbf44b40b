"""Tune a locate-then-edit method's key hyper-parameter (MEMIT's and EMMET's λ = mom2_update_weight,
AlphaEdit's L2 ...) and the clamp for a model without a published preset.

Held-out facts that the model already knows (greedy first token = the true object), never the
ones the tests edit (``KNOWN`` in tests/helpers): ``--pool full`` takes them from ``counterfact-full`` (one
neighbourhood prompt each), ``--pool counterfact`` from the 500 full-schema cases minus the test's
(ten neighbourhood prompts each, a finer specificity signal). The target
vectors z do not depend on λ, so they are optimised once per clamp value and every λ reuses them.
Facts are edited in independent batches of ``--batch`` from the unedited model.

    python bench/tune_preset.py --model smollm2-135m --facts 30 --batch 10
    python bench/tune_preset.py --method alphaedit --key L2 --values 1,10,100 --clamps 0.75
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from editfast.data.requests import load_dataset
from editfast.engine.kv import encode
from editfast.eval.edit_metrics import edit_metrics, summarize
from editfast.methods.locate_then_edit.base import LocateState
from editfast.methods.locate_then_edit.solve import Moment
from editfast.methods.locate_then_edit.stats import second_moments
from editfast.methods.locate_then_edit.targets import optimize_targets
from editfast.methods.registry import METHODS, resolve_hparams
from editfast.models.load import load_model
from editfast.session.session import edit_batch


@torch.no_grad()
def known_facts(lm, requests, limit: int):
    tok, out = lm.tokenizer, []
    for s in range(0, len(requests), 64):
        chunk = requests[s: s + 64]
        ids, mask = encode(tok, [r.filled() for r in chunk])
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
        top = logits[torch.arange(len(chunk)), mask.sum(1) - 1].argmax(-1).tolist()
        for r, t in zip(chunk, top):
            if t == tok(" " + r.target_true, add_special_tokens=False)["input_ids"][0]:
                out.append(r)
        if len(out) >= limit:
            return out[:limit]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=30)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--method", default="memit")
    ap.add_argument("--key", default="mom2_update_weight", help="the hyper-parameter swept")
    ap.add_argument("--values", "--lambdas", dest="values", default="20000,5000,2000,1000,500,200")
    ap.add_argument("--clamps", default="0.75,2,4")
    ap.add_argument("--layers", default="4,5,6,7,8")
    ap.add_argument("--pool", choices=["full", "counterfact"], default="full")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    lm = load_model(args.model)
    small = load_dataset("counterfact")
    if args.pool == "full":
        used = {r.case_id for r in small}
        pool = [r for r in load_dataset("counterfact-full", 8000) if r.case_id not in used]
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers import KNOWN  # the ten facts the tests edit

        test_ids = {small[i].case_id for i in KNOWN}
        pool = [r for r in small if r.case_id not in test_ids]
    facts = known_facts(lm, pool, args.facts)
    print(f"{len(facts)} known held-out facts: case ids {[r.case_id for r in facts]}")
    layers = [int(x) for x in args.layers.split(",")]
    hp = resolve_hparams(args.method, lm.spec, lm.model.config, {"layers": layers})
    mom2s = second_moments(lm, layers, hp)
    method = METHODS[args.method]
    groups = method.templates(lm, hp, seed=0)
    state = LocateState(moments={l: Moment(c) for l, c in mom2s.items()})
    flat = [t for g in groups for t in g]
    pre = summarize(edit_metrics(lm, facts, "counterfact"))
    print(f"pre: efficacy {pre['efficacy_success']:.3f} paraphrase {pre['paraphrase_success']:.3f} "
          f"neighbourhood {pre['neighborhood_success']:.3f}")
    batches = [facts[i: i + args.batch] for i in range(0, len(facts), args.batch)]
    rows = []
    for clamp in [float(c) for c in args.clamps.split(",")]:
        hp_c = resolve_hparams(args.method, lm.spec, lm.model.config, {"layers": layers, "clamp_norm_factor": clamp})
        t = time.perf_counter()
        site = lm.adapter.layer_tmp.format(layers[-1])
        ll = hp_c.loss_layer(lm.adapter.num_layers(lm.model))
        zs = [torch.stack([x.target for x in optimize_targets(lm, b, hp_c, flat, site, layers[-1], ll)], 1)
              for b in batches]
        z_s = time.perf_counter() - t
        for lam in [float(x) for x in args.values.split(",")]:
            hp_l = resolve_hparams(args.method, lm.spec, lm.model.config,
                                   {"layers": layers, "clamp_norm_factor": clamp, args.key: lam})
            post = []
            for b, z in zip(batches, zs):  # each batch alone, from the unedited model and a fresh state
                saved = {l: lm.adapter.rewrite_weight(lm.model, l).detach().clone() for l in layers}
                state.tensors.clear()
                edit_batch(lm, method, b, hp_l, state, groups, targets=z)
                post += edit_metrics(lm, b, "counterfact")
                with torch.no_grad():
                    for l, w in saved.items():
                        lm.adapter.rewrite_weight(lm.model, l).copy_(w)
            report(rows, {"method": args.method, "clamp": clamp, args.key: lam}, summarize(post), pre,
                   z_seconds=z_s)
    write_rows(rows, args.json)


def report(rows: list, setting: dict, s: dict, pre: dict, **extra) -> None:
    """One tuning row (the setting, held-out success after the edit, neighbourhood before), printed."""
    row = {**setting, "efficacy": s["efficacy_success"], "paraphrase": s["paraphrase_success"],
           "neighbourhood": s["neighborhood_success"], "neighbourhood_pre": pre["neighborhood_success"],
           "neighbourhood_magnitude": s["neighborhood_magnitude"],
           "neighbourhood_magnitude_pre": pre["neighborhood_magnitude"], **extra}
    rows.append(row)
    print(json.dumps(row), flush=True)


def write_rows(rows: list, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
