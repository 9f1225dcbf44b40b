"""Choose WISE's SmolLM2 act_ratio on held-out facts: one sequential WISE session, scored at several
routing thresholds (the threshold acts at inference only, so one session serves every ratio).

Facts: the first ``--facts`` records of the bundled CounterFact outside the tests' ten KNOWN ones,
edited one after another (one shard) with the SmolLM2 preset and ``--set`` overrides; printed: the
edit metrics before, the training time and each edit's recorded activation, and the metrics after at
each act_ratio.

    python bench/tune_wise.py --facts 5 --ratios 0.88,0.95,1.0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from editfast.data.requests import load_dataset  # noqa: E402
from editfast.eval.edit_metrics import edit_metrics, summarize  # noqa: E402
from editfast.methods.hparams import parse_overrides  # noqa: E402
from editfast.methods.registry import METHODS, resolve_hparams  # noqa: E402
from editfast.models.load import load_model  # noqa: E402

KNOWN = [52, 72, 122, 154, 163, 204, 212, 233, 242, 312]  # tests/helpers' ten test facts
KEYS = ("efficacy_success", "paraphrase_success", "neighborhood_success")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--facts", type=int, default=5)
    ap.add_argument("--ratios", default="0.88,0.95,1.0")
    ap.add_argument("--set", nargs="*", default=[])
    args = ap.parse_args()
    lm = load_model("smollm2-135m")
    wise = METHODS["wise"]
    hp = resolve_hparams("wise", "smollm2-135m", lm.model.config, parse_overrides(args.set))
    data = load_dataset("counterfact")
    facts = [data[i] for i in range(len(data)) if i not in KNOWN][: args.facts]
    templates = wise.templates(lm, hp)
    pre = summarize(edit_metrics(lm, facts, "counterfact"))
    state, trace = wise.prepare(lm, hp), {}
    t = time.perf_counter()
    for r in facts:
        list(wise.edit(lm, [r], hp, state, templates, trace=trace))
    print(f"edits {time.perf_counter() - t:.1f}s, activations {[round(x['activation'], 1) for x in trace['wise']]}")
    print("unedited", {k: round(pre[k], 2) for k in KEYS})
    for ratio in map(float, args.ratios.split(",")):
        hp.act_ratio = ratio
        wise.install(lm, hp, state)
        post = summarize(edit_metrics(lm, facts, "counterfact"))
        print(f"act_ratio {ratio}", {k: round(post[k], 2) for k in KEYS})


if __name__ == "__main__":
    main()
