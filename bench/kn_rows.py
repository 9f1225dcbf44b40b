"""KN benchmark rows: the batched integrated gradients against the original's loop, same run.

- attribution: ``kn.attribution_scores`` with ``backend="fast"`` (every integration step of
  ``layers_per_pass`` layers in one forward/backward of the prompt's last token over the cached
  prefix) against ``backend="reference"`` (the original: per layer and answer token a baseline
  forward, then full-prompt forwards/backwards of ``batch_size`` steps each), on the same
  prompts and answers; ``extra`` says whether both select the same neurons and the largest
  relative difference of the scores;
- a sequential session of KN edits (attribution, greedy continuation, the edit) on both backends
  from the same base weights; ``extra``: seconds per edit and whether the final weights agree.

``ratio = reference_s / fast_s``.

    python bench/kn_rows.py [--quick] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.kernel_rows import device_name, row  # noqa: E402
from editfast.data.requests import load_dataset  # noqa: E402
from editfast.methods import kn  # noqa: E402
from editfast.methods.registry import resolve_hparams  # noqa: E402
from editfast.models.load import load_model  # noqa: E402
from editfast.models.update import restore  # noqa: E402
from editfast.session.session import EditSession  # noqa: E402


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kn_rows(model: str, quick: bool, device: str, dtype: str) -> list[dict]:
    lm = load_model(model, device=device, dtype=dtype)
    dev = device_name(torch.device(device))
    hp = resolve_hparams("kn", lm.spec, lm.model.config)
    n = 2 if quick else 5
    reqs = load_dataset("counterfact", n)
    per = kn.layers_per_pass(hp, len(hp.layers), lm.device)
    sizes = (f"{model}, {len(hp.layers)} layers x {hp.steps} steps ({per} layers a pass; original: batches of "
             f"{hp.batch_size} steps), {n} prompts")
    rows = []
    kn.attribution_scores(lm, reqs[0].filled(), reqs[0].target_true, hp, "fast")  # warm-up
    times, same, diff = {"fast": 0.0, "reference": 0.0}, True, 0.0
    for r in reqs:
        got = {}
        for backend in ("reference", "fast"):
            _sync()
            t = time.perf_counter()
            got[backend] = kn.attribution_scores(lm, r.filled(), r.target_true, hp, backend)
            _sync()
            times[backend] += time.perf_counter() - t
        a, b = got["fast"].float(), got["reference"].float()
        diff = max(diff, ((a - b).abs().max() / b.abs().max()).item())
        same &= kn.coarse_neurons(a, hp.adaptive_threshold) == kn.coarse_neurons(b, hp.adaptive_threshold)
    rows.append(row("kn: attribution, batched vs step loop", dev, sizes, dtype, times["reference"], times["fast"],
                    f"same neurons: {same}; max rel. score diff {diff:.1e}"))
    # sequential edits on both backends from the same base
    m = 2 if quick else 4
    secs, weights = {}, {}
    for backend in ("reference", "fast"):
        s = EditSession(lm, "kn", reqs[:m], evaluate=False, progress=False, backend=backend)
        secs[backend] = s.run().timings["edit_s"]
        weights[backend] = {k: lm.model.get_parameter(k).detach().clone() for k in s.sites}
        restore(lm, s.base)
    wdiff = max(((weights["fast"][k] - weights["reference"][k]).abs().max()).item() for k in s.sites)
    rows.append(row("kn: session of edits, fast vs reference", dev, f"{model}, {m} sequential edits", dtype,
                    secs["reference"], secs["fast"], f"{secs['fast'] / m:.1f} s/edit fast, "
                                                      f"{secs['reference'] / m:.1f} reference; "
                                                      f"max |W_fast - W_ref| {wdiff:.1e}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None, help="default: smollm2-135m on CPU, random:gpt2-xl on CUDA")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", "float32") if cuda else ("cpu", "float32")
    model = args.model or ("random:gpt2-xl" if cuda else "smollm2-135m")
    for r in kn_rows(model, args.quick, device, dtype):
        print(f"{r['name']:<44} {r['device']:<22} {r['sizes']}\n    reference {r['baseline_s']:.2f}s  "
              f"fast {r['editfast_s']:.2f}s  ratio {r['ratio']:.2f}x  {r['extra']}", flush=True)


if __name__ == "__main__":
    main()
