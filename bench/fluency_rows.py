"""Benchmark row of CounterFact's fluency: the generation prompts of the checkpoints' probe set
sampled as one batch through the engine (shared prefixes, continuous batching) against one prompt
after another (the same engine, one request per call), same seeds: the texts must be identical.

    python bench/fluency_rows.py [--quick] [--model M]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.kernel_rows import device_name, row
from editfast.engine.engine import Engine
from editfast.eval.generation import ngram_entropy, probe, texts
from editfast.models.load import load_model


def fluency_rows(model: str, quick: bool, device: str, dtype: str, records: int | None = None) -> list[dict]:
    lm = load_model(model, device=device, dtype=dtype)
    records = records or (2 if quick else 5)
    gp = probe(lm.tokenizer, seed=0, records=records)
    eng = Engine(lm, progress=False)
    texts(eng, gp.samples[:2])  # warm: threads up, kernels chosen
    t = time.perf_counter()
    one_by_one = [texts(eng, [s])[0] for s in gp.samples]
    base_s = time.perf_counter() - t
    print(f"one prompt after another: {base_s:.1f} s", file=sys.stderr, flush=True)
    t = time.perf_counter()
    batched = texts(eng, gp.samples)
    fast_s = time.perf_counter() - t
    same = sum(a == b for a, b in zip(one_by_one, batched))
    new = sum(s.max_new_tokens for s in gp.samples)
    flu = sum(ngram_entropy(x) for x in batched) / len(batched)
    return [row("fluency generation: one batch vs one prompt after another", device_name(torch.device(device)),
                f"{model}, {len(gp.samples)} prompts ({records} records), {new} sampled tokens", dtype, base_s, fast_s,
                f"{same}/{len(batched)} texts identical; {new / base_s:.0f} vs {new / fast_s:.0f} tok/s; "
                f"fluency {flu:.3f}")]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--records", type=int, default=None, help="probe records (10 prompts each)")
    args = ap.parse_args()
    for r in fluency_rows(args.model, args.quick, "cpu", "float32", args.records):
        print(r)
