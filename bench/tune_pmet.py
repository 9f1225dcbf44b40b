"""Tune PMET's SmolLM2 preset: the target optimisation's settings, then λ (mom2_update_weight).

The same protocol as MEMIT's (``bench/tune_preset.py``): held-out facts that the model already
knows (greedy first token = the true object) from ``counterfact-full``, never the 500 bundled
cases (so never the ten of tests/test_edit.py), edited in independent batches of ``--batch`` from
the unedited model. PMET's targets (attention and MLP outputs optimised together) do not depend
on λ, so they are optimised once per optimisation setting and every λ reuses them.

    python bench/tune_pmet.py --facts 30 --batch 10 --json /tmp/pmet_tune.json

``--opts``: optimisation settings "steps/lr/kl_factor/clamp", comma separated; the two published
styles are the original's GPT-J file (30/0.2/1/0.75) and EasyEdit's Llama-2 file (20/0.5/0.0625/1).
"""

from __future__ import annotations

import argparse
import time

import torch
from tune_preset import (  # bench/ is the script's directory
    known_facts,
    report,
    write_rows,
)

from editfast.data.requests import load_dataset
from editfast.eval.edit_metrics import edit_metrics, summarize
from editfast.methods.locate_then_edit.base import LocateState
from editfast.methods.locate_then_edit.solve import Moment
from editfast.methods.locate_then_edit.stats import second_moments
from editfast.methods.registry import METHODS, resolve_hparams
from editfast.models.load import load_model
from editfast.session.session import edit_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=30)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--lambdas", default="15000,6000,2000,1000,500")
    ap.add_argument("--opts", default="20/0.5/0.0625/0.75,20/0.5/0.0625/1,30/0.2/1/0.75")
    ap.add_argument("--layers", default="4,5,6,7,8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    lm = load_model(args.model)
    used = {r.case_id for r in load_dataset("counterfact")}
    pool = [r for r in load_dataset("counterfact-full", 8000) if r.case_id not in used]
    facts = known_facts(lm, pool, args.facts)
    print(f"{len(facts)} known held-out facts: case ids {[r.case_id for r in facts]}", flush=True)
    layers = [int(x) for x in args.layers.split(",")]
    pmet = METHODS["pmet"]

    def hparams(**kw):
        return resolve_hparams("pmet", lm.spec, lm.model.config, {"layers": layers, **kw})

    hp = hparams()
    state = LocateState(moments={l: Moment(c) for l, c in second_moments(lm, layers, hp).items()})
    groups = pmet.templates(lm, hp, seed=0)
    pre = summarize(edit_metrics(lm, facts, "counterfact"))
    print(f"pre: efficacy {pre['efficacy_success']:.3f} paraphrase {pre['paraphrase_success']:.3f} "
          f"neighbourhood {pre['neighborhood_success']:.3f}", flush=True)
    batches = [facts[i: i + args.batch] for i in range(0, len(facts), args.batch)]
    rows = []
    for opt in args.opts.split(","):
        steps, lr, kl, clamp = opt.split("/")
        setting = dict(v_num_grad_steps=int(steps), v_lr=float(lr), kl_factor=float(kl), clamp_norm_factor=float(clamp))
        hp_o = hparams(**setting)
        t = time.perf_counter()
        traces = [{} for _ in batches]
        zs = [pmet.optimize(lm, b, hp_o, groups, trace=tr) for b, tr in zip(batches, traces)]
        z_s = time.perf_counter() - t
        steps_done = sum(len(l) for tr in traces for l in tr["losses"])
        print(f"targets {opt}: {z_s:.0f} s, {steps_done} steps", flush=True)
        for lam in [float(x) for x in args.lambdas.split(",")]:
            hp_l = hparams(**setting, mom2_update_weight=lam)
            post = []
            for b, z in zip(batches, zs):
                saved = {l: lm.adapter.rewrite_weight(lm.model, l).detach().clone() for l in layers}
                edit_batch(lm, pmet, b, hp_l, state, groups, targets=z)
                post += edit_metrics(lm, b, "counterfact")
                with torch.no_grad():
                    for l, w in saved.items():
                        lm.adapter.rewrite_weight(lm.model, l).copy_(w)
            report(rows, {**setting, "lambda": lam}, summarize(post), pre, z_seconds=round(z_s, 1),
                   z_steps=steps_done)
    write_rows(rows, args.json)


if __name__ == "__main__":
    main()
