"""The README's golden table: the worst relative error over every tensor of each golden case, per
mode (end to end / staged) and backend (fast / reference), with the tensor it occurs at.

    python bench/golden_table.py [--only PREFIX]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the golden harness the tests use: tests/helpers/golden.py

from helpers import golden as tg  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="case-name prefix, e.g. alphaedit")
    args = ap.parse_args()
    print("| case | e2e fast | e2e reference | staged fast | staged reference |\n|---|---|---|---|---|")
    for meta_path in tg.CASES:
        case = meta_path.parent
        if not case.name.startswith(args.only):
            continue
        meta = json.loads(meta_path.read_text())
        gold = load_file(str(case / "tensors.safetensors"))
        if case.name.startswith("stats_"):
            continue
        cells = []
        for staged in (False, True):
            for backend in ("fast", "reference"):
                lm = tg.case_model(meta)
                saved = {k: v.clone() for k, v in lm.model.state_dict().items()}
                produced, names, tol, _, _ = tg.produce(case, meta, gold, staged, backend)
                lm.model.load_state_dict(saved)
                errs = {n: tg.rel_err(produced[n], gold[n]) for n in names if n in produced}
                worst = max(errs, key=lambda n: errs[n] / tol(n))
                ok = all(e <= tol(n) for n, e in errs.items()) and len(errs) == len(names)
                cells.append(f"{errs[worst]:.1e} ({worst}) {'pass' if ok else 'FAIL'}")
        print(f"| {case.name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
