"""One table of every benchmark: editfast's fast path against the reference path, same run.

    python bench/run.py [--quick] [--json FILE] [--model M] [--only kernels|engine|pipeline|session]

Rows: kernels (second moment vs X.T@X, low-rank update vs W.add_(U@V.T) and vs a plain copy,
fused log-probabilities vs full logits), the evaluation engine vs lm-evaluation-harness on the
same log-likelihood and generation requests, and pipeline stages on a real model: statistics one pass vs per-layer passes, targets batched vs
per request, MEMIT end to end fast vs reference (statistics excluded: both read the same cached
C), sequential sessions (checkpoint overhead, resume; ``session_rows.py``) and the methods built
on the pipeline (AlphaEdit, EMMET: sessions and solves, fast vs reference; ``method_rows.py``).
``ratio = baseline_s / editfast_s``. On CPU the kernel rows that run the Triton interpreter
only prove the harness works; the pipeline rows are real CPU ratios. ``--quick`` (CPU, 2 cores)
finishes within 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.kernel_rows import device_name, kernel_rows, median_time, row  # noqa: E402
from editfast.data.corpus import corpus_texts  # noqa: E402
from editfast.data.requests import load_dataset  # noqa: E402
from editfast.methods.locate_then_edit.base import LocateState  # noqa: E402
from editfast.methods.locate_then_edit.solve import Moment  # noqa: E402
from editfast.methods.locate_then_edit.stats import (
    accumulate_second_moments,
    second_moments,
    token_batches,
)
from editfast.methods.locate_then_edit.targets import optimize_targets  # noqa: E402
from editfast.methods.registry import (
    METHODS,
    resolve_hparams,  # noqa: E402
)
from editfast.models.load import load_model  # noqa: E402
from editfast.session.session import edit_batch


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def restore_after(lm, layers):
    saved = {l: lm.adapter.rewrite_weight(lm.model, l).detach().clone() for l in layers}

    def restore():
        with torch.no_grad():
            for l, w in saved.items():
                lm.adapter.rewrite_weight(lm.model, l).copy_(w)

    return restore


def pipeline_rows(model: str, quick: bool, device: str, dtype: str) -> list[dict]:
    lm = load_model(model, device=device, dtype=dtype)
    dev = device_name(torch.device(device))
    hp = resolve_hparams("memit", lm.spec, lm.model.config)
    layers = hp.layers
    rows = []

    # statistics: one pass for all layers vs one pass per layer (the original), same batches
    texts = corpus_texts("wikitext", 64 if quick else 400)
    batches = list(token_batches(lm.tokenizer, texts, 128))
    n_tok = sum(int(m.sum()) for _, m in batches)
    ref_s = timed(lambda: accumulate_second_moments(lm, layers, batches, backend="reference"))
    fast_s = timed(lambda: accumulate_second_moments(lm, layers, batches, backend="fast"))
    rows.append(row("statistics: one pass vs per-layer passes", dev,
                     f"{model}, layers {layers[0]}-{layers[-1]}, {n_tok} tokens", dtype, ref_s, fast_s,
                     f"{n_tok / fast_s:.0f} tok/s vs {n_tok / ref_s:.0f} tok/s"))

    # targets: all facts of a batch together vs one at a time (same steps, same z)
    n = 10 if quick else 50
    reqs = load_dataset("counterfact", n)
    memit = METHODS["memit"]
    groups = memit.templates(lm, hp, mode="fixed")
    flat = [t for g in groups for t in g]
    site = lm.adapter.layer_tmp.format(layers[-1])
    ll = hp.loss_layer(lm.adapter.num_layers(lm.model))
    # (reference: as the original, full [B, T, V] logits; reference-lean: LM head at the scored
    # positions only, which isolates what batching itself gains)
    runs = {}
    for backend in ("reference", "reference-lean", "fast"):
        t = time.perf_counter()
        res = optimize_targets(lm, reqs, hp, flat, site, layers[-1], ll, backend=backend)
        runs[backend] = (time.perf_counter() - t, res)
    fast_s, fast = runs["fast"]
    for backend, label in (("reference", "per-request (original)"), ("reference-lean", "per-request, lean head")):
        ref_s, ref = runs[backend]
        err = max(((a.target - b.target).norm() / b.target.norm()).item() for a, b in zip(fast, ref))
        steps = sum(len(r.losses) for r in ref)
        rows.append(row(f"targets: batched vs {label}", dev, f"{model}, n={n}, {steps} steps in all", dtype,
                         ref_s, fast_s, f"max rel z difference {err:.1e}"))

    # MEMIT end to end (statistics cached and shared): fast vs reference backend
    mom2s = second_moments(lm, layers, hp, progress=False)
    restore = restore_after(lm, layers)

    def state():
        return LocateState(moments={l: Moment(c) for l, c in mom2s.items()})

    ref_s = timed(lambda: edit_batch(lm, memit, reqs, hp, state(), groups, backend="reference"))
    restore()
    fast_s = timed(lambda: edit_batch(lm, memit, reqs, hp, state(), groups, backend="fast"))
    restore()
    rows.append(row("MEMIT end to end (excl. statistics)", dev, f"{model}, n={n}, layers {layers}", dtype,
                     ref_s, fast_s, f"{n / fast_s:.2f} edits/s vs {n / ref_s:.2f}"))
    return rows


def engine_rows(model: str, quick: bool, device: str, dtype: str) -> list[dict]:
    """Requests/s of editfast's engine vs lm-evaluation-harness's HFLM on the same requests: the
    log-likelihood requests of RTE, BoolQ, SST-2 and MuTual, and the generation requests of
    GSM8K, CoNLL-03, SAMSum and NQ (standard protocol)."""
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return []
    from editfast.engine.engine import Engine
    from editfast.engine.requests import Generate, LogLik
    from editfast.eval.runner import select
    from editfast.eval.tasks import resolve_tasks

    lm = load_model(model, device=device, dtype=dtype)
    dev = device_name(torch.device(device))

    def requests(tasks: str, kind: type, per_task: int) -> list:
        return [r for task in resolve_tasks(tasks) for ex in select(task, per_task, seed=0)
                for r in task.requests(ex, "standard") if isinstance(r, kind)]

    hf = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=16, device=device)
    eng = Engine(lm, progress=False)
    rows = []

    ll = requests("rte,boolq,sst2,mutual", LogLik, 20 if quick else 100)
    inst = [Instance(request_type="loglikelihood", doc={}, arguments=(r.context, r.continuation), idx=i)
            for i, r in enumerate(ll)]
    base_s = timed(lambda: hf.loglikelihood(inst, disable_tqdm=True))
    fast_s = timed(lambda: eng.loglikelihood(ll))
    rows.append(row("engine loglikelihood vs lm-eval HFLM", dev,
                    f"{model}, {len(ll)} requests (rte, boolq, sst2, mutual)", dtype, base_s, fast_s,
                    f"{len(ll) / fast_s:.1f} req/s vs {len(ll) / base_s:.1f} req/s (HFLM batch 16)"))

    gen = requests("gsm8k,conll03,samsum,nq", Generate, 4 if quick else 16)
    inst = [Instance(request_type="generate_until", doc={}, idx=i, arguments=(
        r.prompt, {"until": list(r.stop), "max_gen_toks": r.max_new_tokens, "do_sample": False}))
        for i, r in enumerate(gen)]
    got: dict[str, list[str]] = {}
    base_s = timed(lambda: got.__setitem__("hf", hf.generate_until(inst, disable_tqdm=True)))
    fast_s = timed(lambda: got.__setitem__("ef", eng.generate(gen)))
    same = sum(a.strip() == b.strip() for a, b in zip(got["hf"], got["ef"]))
    rows.append(row("engine generation vs lm-eval HFLM", dev,
                    f"{model}, {len(gen)} requests (gsm8k, conll03, samsum, nq)", dtype, base_s, fast_s,
                    f"{len(gen) / fast_s:.2f} req/s vs {len(gen) / base_s:.2f} req/s (HFLM batch 16); "
                    f"{same}/{len(gen)} outputs identical"))

    # shared-prefix generation (GSM8K's 8-shot exemplars): cascade attention vs per-row prefix copies
    gsm = requests("gsm8k", Generate, 4 if quick else 16)
    copies = Engine(lm, progress=False, cascade_attention=False)
    base_s = timed(lambda: got.__setitem__("rows", copies.generate(gsm)))
    fast_s = timed(lambda: got.__setitem__("cascade", eng.generate(gsm)))
    same = sum(a == b for a, b in zip(got["rows"], got["cascade"]))
    rows.append(row("generation, shared prefix: cascade vs per-row copies", dev, f"{model}, {len(gsm)} gsm8k requests",
                    dtype, base_s, fast_s, f"{same}/{len(gsm)} outputs identical; cascade={eng.cascade}"))

    rows += attention_rows(lm, dev)

    # continuous batching vs batch after batch, on the two tasks with long answers
    long = requests("gsm8k,samsum", Generate, 8 if quick else 32)
    static = Engine(lm, progress=False, continuous_batching=False)
    base_s = timed(lambda: got.__setitem__("static", static.generate(long)))
    fast_s = timed(lambda: got.__setitem__("continuous", eng.generate(long)))
    same = sum(a == b for a, b in zip(got["static"], got["continuous"]))
    rows.append(row("generation: continuous batching vs batch after batch", dev,
                    f"{model}, {len(long)} requests (gsm8k, samsum)", dtype, base_s, fast_s,
                    f"{same}/{len(long)} outputs identical"))
    return rows


def attention_rows(lm, dev: str) -> list[dict]:
    """One attention layer at the shapes behind two engine choices (CPU only: on other devices
    cascade attention materialises its scores, and the mask question is the CPU kernel's):
    cascade attention in the fused kernel vs materialised scores at a GSM8K prefill (16 rows x 146
    own tokens after the 1,242-token 8-shot prefix), and a 2,048-token perplexity window under
    the causal flag (what the engine runs, no mask) vs an explicit causal mask."""
    if lm.model.device.type != "cpu":
        return []
    from editfast.engine import cascade

    cfg = lm.model.config
    H, kvh = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    B, q, P = 16, 146, 1242
    qg = torch.randn(B, kvh, H // kvh * q, hd)
    pk, pv = torch.randn(2, kvh, P, hd)
    key, value = torch.randn(2, B, kvh, q, hd)
    allowed = torch.ones(q, q, dtype=torch.bool).tril().repeat(H // kvh, 1).expand(B, 1, -1, -1)
    args = (qg, pk, pv, key, value, allowed, hd ** -0.5)
    base_s, fast_s = median_time(lambda: cascade._explicit(*args)), median_time(lambda: cascade._fused(*args))
    err = (cascade._explicit(*args) - cascade._fused(*args)).abs().max().item()
    rows = [row("cascade attention (one layer): fused kernel vs materialised scores", dev,
                f"{B} rows x {q} own tokens, prefix {P}, {H} heads / {kvh} kv heads", "float32", base_s, fast_s,
                f"max |diff| {err:.1e}")]
    x = torch.randn(2, H, 2048, hd)
    mask = torch.ones(2048, 2048, dtype=torch.bool).tril()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    base_s = median_time(lambda: sdpa(x, x, x, attn_mask=mask))
    fast_s = median_time(lambda: sdpa(x, x, x, is_causal=True))
    rows.append(row("perplexity window attention (one layer): causal flag vs explicit mask", dev,
                    f"2 windows x 2048 tokens, {H} heads", "float32", base_s, fast_s, "torch SDPA, CPU"))
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'name':<44} {'device':<22} {'sizes':<44} {'dtype':<9} {'baseline':>10} {'editfast':>10} {'ratio':>7}  extra"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<44} {r['device']:<22} {r['sizes']:<44} {r['dtype']:<9} {r['baseline_s']:>9.4f}s "
              f"{r['editfast_s']:>9.4f}s {r['ratio']:>6.2f}x  {r.get('extra', '')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: within 10 minutes on a 2-core CPU")
    ap.add_argument("--json", default=None, help="also write the rows as a JSON list")
    ap.add_argument("--model", default=None, help="default: smollm2-135m on CPU, random:gpt2-xl on CUDA")
    ap.add_argument("--skip-pipeline", action="store_true", help="kernel rows only")
    ap.add_argument("--only", choices=("kernels", "engine", "pipeline", "session", "methods"), default=None,
                    help="one group of rows")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    model = args.model or ("random:gpt2-xl" if cuda else "smollm2-135m")
    print(f"# editfast bench · {platform.node()} · torch {torch.__version__} · threads {torch.get_num_threads()} · "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    from bench.fluency_rows import fluency_rows
    from bench.method_rows import method_rows
    from bench.session_rows import session_rows
    from bench.test_bench_logprob import logprob_rows

    groups = {"kernels": lambda: kernel_rows(args.quick) + logprob_rows(args.quick),
              "engine": lambda: engine_rows(model, args.quick, device, dtype)
              + fluency_rows(model, args.quick, device, dtype),
              "pipeline": lambda: pipeline_rows(model, args.quick, device, dtype),
              "session": lambda: session_rows(model, args.quick, device, dtype),
              "methods": lambda: method_rows(model, args.quick, device, dtype)}
    chosen = [args.only] if args.only else ["kernels"] if args.skip_pipeline else list(groups)
    rows = [r for g in chosen for r in groups[g]()]
    keep = ("name", "device", "sizes", "dtype", "baseline_s", "editfast_s", "ratio")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([{k: r[k] for k in keep} | {"extra": r.get("extra", "")} for r in rows],
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
