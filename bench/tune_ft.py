"""Choose FT-L's and FT-M's SmolLM2 presets on held-out facts: a small grid over layer and ε.

Facts: ``counterfact-full`` records outside the bundled 500 (so never the efficacy test's ten) whose
true object SmolLM2 predicts greedily (``tune_preset.known_facts``), after the first ``--skip``. Each
configuration edits them one at a time (the methods' default batch of 1) in one sequential session
per ``--group`` facts, each session from the unedited model, and reports the edit metrics of all of
them after each session's last edit. The runs behind the presets (docs/methods.md has the table;
each configuration was also run as its own process, as here):

    python bench/tune_ft.py --method ft-l --facts 4 --group 4 --grid "layers=[0]" "norm_constraint=5e-4;2e-3;1e-2"
    python bench/tune_ft.py --method ft-m --facts 4 --group 4 --grid "layers=[0];[5];[10]" "norm_constraint=false"
    python bench/tune_ft.py --method ft-l --skip 4 --facts 8 --group 8 --grid "layers=[0]" \
        "norm_constraint=5e-4;2e-3;5e-3;1e-2"
    python bench/tune_ft.py --method ft-m --skip 4 --facts 8 --group 8 --grid "layers=[0];[5];[20]" "norm_constraint=false"

Grid values are ``key=v1;v2`` items (each value YAML), every combination run."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.tune_preset import known_facts  # noqa: E402
from editfast.data.requests import load_dataset  # noqa: E402
from editfast.eval.edit_metrics import summarize  # noqa: E402
from editfast.methods.hparams import parse_overrides  # noqa: E402
from editfast.models.load import load_model  # noqa: E402
from editfast.models.update import restore  # noqa: E402
from editfast.session.session import EditSession  # noqa: E402


def grid(items: list[str]) -> list[dict]:
    """``key=a;b`` items (values separated by ';', each YAML) -> every combination as overrides."""
    keys, values = [], []
    for item in items:
        key, _, text = item.partition("=")
        keys.append(key)
        values.append([parse_overrides([f"{key}={v}"])[key] for v in text.split(";")])
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", choices=["ft-l", "ft-m"], default="ft-l")
    ap.add_argument("--facts", type=int, default=10)
    ap.add_argument("--group", type=int, default=5, help="facts per session (each from the unedited model)")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first SKIP held-out known facts")
    ap.add_argument("--grid", nargs="*", default=["layers=[0];[5];[10]", "norm_constraint=5e-4;2e-3;false"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lm = load_model(args.model)
    used = {r.case_id for r in load_dataset("counterfact")}
    pool = [r for r in load_dataset("counterfact-full", 4000) if r.case_id not in used]
    facts = known_facts(lm, pool, args.skip + args.facts)[args.skip:]
    print(f"{len(facts)} held-out known facts: case ids {[r.case_id for r in facts]}", flush=True)
    rows = []
    for over in grid(args.grid):
        t = time.perf_counter()
        pre, post, edit_s = [], [], 0.0
        for g in range(0, len(facts), args.group):
            s = EditSession(lm, args.method, facts[g: g + args.group], overrides=over, progress=False)
            res = s.run()
            restore(lm, s.base)
            pre += [x["pre"] for x in res.per_request]
            post += [x["post"] for x in res.per_request]
            edit_s += res.timings["edit_s"]
        pre, post = summarize(pre), summarize(post)
        row = {**over, "efficacy": post["efficacy_success"], "paraphrase": post["paraphrase_success"],
               "neighbourhood": post["neighborhood_success"], "neighbourhood_pre": pre["neighborhood_success"],
               "p_new": post["p_new"], "p_new_pre": pre["p_new"], "s_per_edit": edit_s / len(facts),
               "seconds": time.perf_counter() - t}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
