"""Choose KN's SmolLM2 preset on held-out facts: a small grid over what KN leaves open.

Facts: ``counterfact-full`` records outside the bundled 500 (so never the test's ten) whose true
object SmolLM2 predicts greedily (``tune_preset.known_facts``), after the first ``--skip``. Each
configuration edits them in sequential sessions of ``--group`` facts, each session from the
unedited model (one fact at a time, as the efficacy test does), and reports the edit metrics of
all of them after each session's last edit. The two rounds behind the preset
(``editfast/methods/kn.py``'s docstring has the tables):

    python bench/tune_kn.py --grid wide --facts 10                       # round 1
    python bench/tune_kn.py --grid easyedit --skip 10 --facts 30 --group 10   # round 2

Grids: "wide" also varies ``target_prefix`` ("" is EasyEdit's tokenisation, " " the token the
metrics score); both vary ``adaptive_threshold`` and ``steps``. ``lr_scale`` stays 1.0 (the
original's scale).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.tune_preset import known_facts  # noqa: E402
from editfast.data.requests import load_dataset  # noqa: E402
from editfast.eval.edit_metrics import summarize  # noqa: E402
from editfast.models.load import load_model  # noqa: E402
from editfast.models.update import restore  # noqa: E402
from editfast.session.session import EditSession  # noqa: E402

GRIDS = {
    "wide": [dict(target_prefix=p, adaptive_threshold=t, steps=s, batch_size=s)
             for p in ("", " ") for s, t in ((20, 0.1), (20, 0.2), (20, 0.3), (1, 0.2))],
    "easyedit": [dict(adaptive_threshold=t, steps=s, batch_size=s) for s, t in ((20, 0.1), (20, 0.2), (20, 0.3),
                                                                              (1, 0.2))],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--group", type=int, default=10, help="facts per session (each from the unedited model)")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first SKIP held-out known facts")
    ap.add_argument("--grid", choices=list(GRIDS), default="wide")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lm = load_model(args.model)
    used = {r.case_id for r in load_dataset("counterfact")}
    pool = [r for r in load_dataset("counterfact-full", 4000) if r.case_id not in used]
    facts = known_facts(lm, pool, args.skip + args.facts)[args.skip:]
    print(f"{len(facts)} held-out known facts: case ids {[r.case_id for r in facts]}", flush=True)
    rows = []
    for over in GRIDS[args.grid]:
        t = time.perf_counter()
        pre, post, edit_s, neurons = [], [], 0.0, 0
        for g in range(0, len(facts), args.group):
            s = EditSession(lm, "kn", facts[g: g + args.group], overrides=over, progress=False)
            res = s.run()
            restore(lm, s.base)
            pre += [x["pre"] for x in res.per_request]
            post += [x["post"] for x in res.per_request]
            edit_s += res.timings["edit_s"]
            neurons += sum(len(u.index) // lm.adapter.d_model(lm.model) for ups in res.journal for u in ups)
        pre, post = summarize(pre), summarize(post)
        row = {**over, "efficacy": post["efficacy_success"], "paraphrase": post["paraphrase_success"],
               "neighbourhood": post["neighborhood_success"], "neighbourhood_pre": pre["neighborhood_success"],
               "p_true": post["p_true"], "p_true_pre": pre["p_true"], "p_new": post["p_new"],
               "p_new_pre": pre["p_new"], "s_per_edit": edit_s / len(facts), "neurons": neurons / len(facts),
               "seconds": time.perf_counter() - t}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
