"""Second-moment statistics C = E[k kᵀ] of the keys (inputs of the MLP output projection).

One forward pass over the corpus collects C for every requested layer at once, and stops after
the deepest of them (no upper layers, no LM head). Padding positions are never counted. The
moment is uncentred and divides by the number of real tokens, like the original code; λ of MEMIT
multiplies this mean-normalised matrix.
"""

from __future__ import annotations

import contextvars
import hashlib
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from editfast.core import distributed as dist
from editfast.core.errors import HParamsError, ModelError
from editfast.core.paths import cache_dir, cache_lock, write_cache
from editfast.data.corpus import HUB, Corpus, open_corpus
from editfast.engine.kv import right_pad
from editfast.kernels.second_moment import mirror_upper_, second_moment_accumulate_
from editfast.models.placement import execution_device, input_device
from editfast.models.trace import Trace

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SecondMoment:
    total: torch.Tensor  # Σ k kᵀ, [d_mlp, d_mlp]
    count: int  # number of keys (real tokens)

    def moment(self) -> torch.Tensor:
        return self.total / self.count


def token_batches(tok, texts: Sequence[str], max_tokens: int, batch_tokens: int = 4096):
    """Tokenise, cut at ``max_tokens``, sort by length and yield right-padded (ids, mask) batches."""
    rows = [tok(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    rows = sorted((r for r in rows if r), key=len)
    pad = tok.pad_token_id or 0
    i = 0
    while i < len(rows):
        n = 1  # rows are sorted, so the batch width is its last row's length
        while i + n < len(rows) and (n + 1) * len(rows[i + n]) <= batch_tokens:
            n += 1
        yield right_pad(rows[i: i + n], pad)
        i += n


@torch.no_grad()
def accumulate_second_moments(lm, layers: Sequence[int], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                              dtype: torch.dtype = torch.float32, progress: bool = False,
                              total_tokens: int | None = None, backend: str = "fast") -> dict[int, SecondMoment]:
    """C for all ``layers`` from ``batches`` of (input_ids, attention_mask).

    fast: one pass for all layers, stopped after the deepest. reference: the original algorithm,
    one pass per layer (each stopped at its layer), full fp32 ``aᵀa`` per batch.
    """
    if backend == "reference":
        batches = list(batches)
        return {l: _one_pass(lm, [l], batches, dtype, progress, total_tokens, upper=False)[l] for l in layers}
    if backend != "fast":
        raise ValueError(f"backend must be 'fast' or 'reference', got {backend!r}")
    return _one_pass(lm, layers, batches, dtype, progress, total_tokens, upper=dtype == torch.float32)


def _one_pass(lm, layers, batches, dtype, progress, total_tokens, upper: bool, resume: dict | None = None,
              checkpoint=None, every: int = 50) -> dict[int, SecondMoment]:
    """One forward over ``batches`` stopped after the deepest of ``layers``.

    upper: accumulate with the second-moment kernel (upper triangle on CUDA), mirrored at the
    end; otherwise a full fp32/fp64 ``aᵀa`` per batch, as the original code.
    resume: {"totals": {layer: tensor}, "count": int, "batches": int} of an interrupted run;
    checkpoint(state) is called every ``every`` batches with the same structure.
    """
    model, adapter = lm.model, lm.adapter
    device = input_device(model)
    names = {l: adapter.rewrite_tmp.format(l) for l in layers}
    d = adapter.d_mlp(model)
    at = {l: execution_device(model.get_submodule(names[l])) for l in layers}  # a device map: each layer's own
    totals = {l: torch.zeros(d, d, dtype=dtype, device=at[l]) for l in layers}
    count, done = 0, 0
    if resume:
        totals = {l: resume["totals"][l].to(device=at[l], dtype=dtype).clone() for l in layers}
        count, done = resume["count"], resume["batches"]
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="statistics", disable=not progress)
    bar.update(count)
    for b, (ids, mask) in enumerate(batches):
        if b < done:
            continue
        ids, mask = ids.to(device), mask.to(device)
        with Trace(model, inputs=list(names.values()), stop=True) as tr:
            model(input_ids=ids, attention_mask=mask)
        keep = mask.bool()
        for l, n in names.items():
            if upper:
                second_moment_accumulate_(totals[l], tr.inputs[n], rows=keep.to(at[l]))
            else:
                x = tr.inputs[n][keep.to(at[l])].to(dtype)
                totals[l].addmm_(x.T, x)
        n_tok = int(keep.sum())
        count += n_tok
        bar.update(n_tok)
        if checkpoint is not None and (b + 1) % every == 0:
            checkpoint({"totals": totals, "count": count, "batches": b + 1})
    bar.close()
    if upper:
        for t in totals.values():
            mirror_upper_(t)
    return {l: SecondMoment(totals[l], count) for l in layers}


_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("editfast_stats_root", default=None)


def stats_root() -> Path:
    """Where statistics are written: the ``stats_location`` in effect (a hparams file's ``stats_dir``), else
    ``cache_dir()/stats``."""
    return _ROOT.get() or cache_dir() / "stats"


def stats_roots() -> list[Path]:
    """Where statistics are looked for, in order: the ``stats_location`` in effect, then ``cache_dir()/stats``."""
    return list(dict.fromkeys([stats_root(), cache_dir() / "stats"]))


@contextmanager
def stats_location(path: str | Path | None):
    """Within the block, cached statistics are read from and written under ``path`` (None: the default)."""
    token = _ROOT.set(Path(path).expanduser() if path is not None else None)
    try:
        yield
    finally:
        _ROOT.reset(token)


def cache_tag(corpus_key: str, n_samples: int, max_tokens: int, mom2_dtype: str, model_dtype) -> str:
    """The statistics' cache key: the corpus content, the samples really used, the token cut, both dtypes."""
    return hashlib.sha256(f"{corpus_key}|{n_samples}|{max_tokens}|{mom2_dtype}|{model_dtype}".encode()).hexdigest()[:16]


def cache_file(fingerprint: str, layer: int, tag: str, root: Path | None = None) -> Path:
    """The statistics file of ``layer`` for the weights ``fingerprint`` under ``root`` (default: where they are
    written, ``stats_root()``)."""
    return (root or stats_root()) / fingerprint[:24] / f"layer{layer}-{tag}.safetensors"


def _cache_file(lm, layer: int, corpus: str, n_samples: int, max_tokens: int, dtype: str,
                root: Path | None = None) -> Path:
    """Keyed by the weights as they are now: a model edited since loading has statistics of its own."""
    return cache_file(lm.weights_fingerprint, layer, cache_tag(corpus, n_samples, max_tokens, dtype, lm.dtype), root)


def _save_partial(path: Path, state: dict) -> bool:
    tensors = {f"total.layer{l}": t.detach().cpu().contiguous() for l, t in state["totals"].items()}
    meta = {"count": str(state["count"]), "batches": str(state["batches"])}
    return write_cache(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _corrupt(path: Path, why: str) -> None:
    """Warn that a cache file is corrupt and remove it (it is rebuilt)."""
    warnings.warn(f"ignoring the corrupt cache file {path} ({why}); recomputing it", RuntimeWarning, stacklevel=2)
    try:
        path.unlink()
    except OSError:
        pass


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """All tensors and the metadata of a safetensors file; None (with a warning) if unreadable."""

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        _corrupt(path, " ".join(str(e).split())[:120] or type(e).__name__)
        return None


def _load_partial(path: Path, layers: Sequence[int], d: int) -> dict | None:
    """The checkpoint of an interrupted pass over ``layers``, or None (a corrupt one is removed
    with a warning: running sums of the wrong layers or shape, non-finite, or bad counts)."""
    if not path.is_file() or (read := _read_tensors(path)) is None:
        return None
    tensors, meta = read
    want = {f"total.layer{l}" for l in layers}
    try:
        count, batches = int(meta["count"]), int(meta["batches"])
    except (KeyError, ValueError):
        return _corrupt(path, "no token and batch counts")
    if set(tensors) != want or any(t.shape != (d, d) or not t.is_floating_point() for t in tensors.values()):
        return _corrupt(path, f"expected {len(want)} running sums of shape [{d}, {d}]")
    if count < 0 or batches < 0 or not all(bool(t.isfinite().all()) for t in tensors.values()):
        return _corrupt(path, "non-finite running sums or negative counts")
    return {"totals": {l: tensors[f"total.layer{l}"] for l in layers}, "count": count, "batches": batches}


def _load_moment(path: Path, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, dict] | None:
    """A cached C and its metadata (with its token count), or None: missing, or corrupt (truncated,
    wrong tensors, shape or dtype, non-finite, no tokens), in which case it is removed with a warning
    and recomputed."""
    if not path.is_file() or (read := _read_tensors(path)) is None:
        return None
    tensors, meta = read
    c, n = tensors.get("mom2"), tensors.get("count")
    if c is None or c.shape != (d, d) or c.dtype != dtype:
        return _corrupt(path, f"no {str(dtype).removeprefix('torch.')} 'mom2' of shape [{d}, {d}]")
    if n is None or n.numel() != 1 or int(n) <= 0:
        return _corrupt(path, "no positive token count")
    if not bool(c.isfinite().all()):
        return _corrupt(path, "non-finite statistics")
    return c, {**meta, "tokens": str(int(n))}


def corpus_plan(hp) -> tuple[Corpus, int]:
    """The corpus of ``hp.mom2_dataset`` and the number of its texts a pass uses: ``mom2_n_samples``,
    or (with one warning) all of them when the corpus has fewer. A hub corpus (``wikipedia``,
    millions of articles) is not counted: its size is checked when its texts are read."""
    n = hp.mom2_n_samples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise HParamsError(f"mom2_n_samples must be a positive number of paragraphs, got {n!r}")
    if hp.mom2_dataset in HUB:
        try:
            corpus = open_corpus(hp.mom2_dataset)
        except HParamsError:  # the statistics may be cached (imported): reading texts raises this error
            corpus = Corpus(hp.mom2_dataset, "hub", hp.mom2_dataset, [])
    else:
        corpus = open_corpus(hp.mom2_dataset)
    if corpus.kind != "hub":
        have = corpus.size(limit=n)
        if have < n:
            warnings.warn(f"mom2_n_samples={n} but the corpus {hp.mom2_dataset!r} has {have:,} texts; using "
                          f"{have:,}", UserWarning, stacklevel=3)
            n = have
    return corpus, n


def check_corpus(hp, model_dtype: str = "float32") -> None:
    """Raise (before the model loads) unless ``hp.mom2_dataset`` can be read, its first
    ``mom2_n_samples`` texts included (DataError for a bad JSONL line), or, for a hub corpus that
    is not in the local datasets cache, every layer's statistics for these hparams are already in
    the statistics cache (``editfast stats import``)."""
    try:
        corpus = open_corpus(hp.mom2_dataset)
        if corpus.kind != "hub" and corpus.size(limit=hp.mom2_n_samples) == 0:  # reads what a pass would
            raise HParamsError(f"mom2_dataset {hp.mom2_dataset!r} holds no text")
    except HParamsError:
        if hp.mom2_dataset in HUB:
            dt = str(getattr(torch, str(model_dtype).removeprefix("torch."), model_dtype))
            tag = cache_tag(hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_max_tokens, hp.mom2_dtype, dt)
            if all(any(any(r.glob(f"*/layer{l}-{tag}.safetensors")) for r in stats_roots()) for l in hp.layers):
                return
        raise


def second_moments(lm, layers: Sequence[int], hp, progress: bool = True, use_cache: bool = True,
                   checkpoint_every: int = 50, info: dict | None = None) -> dict[int, torch.Tensor]:
    """C for ``layers`` from the hparams' corpus, cached on disk per (model, layer, corpus, size, dtype).

    The size in the cache key is the number of texts really used (``corpus_plan``); a cache file of
    the bundled corpus written under the requested size, before sizes were capped, holds the same
    texts and is still found. Missing layers are computed together in one pass. Every
    ``checkpoint_every`` batches the running sums are saved, so an interrupted run resumes where it
    stopped. A corrupt cached file is recomputed (with a warning); an unwritable cache warns and the
    run goes on without it. A statistic over no tokens or with non-finite entries is an error, never
    returned or cached. ``info`` (a dict) receives, per layer, the corpus, the texts requested and
    used, the tokens counted and whether the cache gave it.
    """
    dtype = DTYPES[hp.mom2_dtype]
    if not isinstance(hp.mom2_max_tokens, int) or hp.mom2_max_tokens < 1:
        raise HParamsError(f"statistics of layer {layers[0]}: mom2_max_tokens={hp.mom2_max_tokens!r} counts no "
                           "tokens (C would be 0/0); it must be >= 1")
    corpus, n = corpus_plan(hp)
    d = lm.adapter.d_mlp(lm.model)
    key = lambda l, size, root=None: _cache_file(lm, l, corpus.key, size, hp.mom2_max_tokens, hp.mom2_dtype, root)
    files = {l: key(l, n) for l in layers}
    out: dict[int, torch.Tensor] = {}
    info = {} if info is None else info
    record = lambda l, tokens, used, cached: info.__setitem__(l, {
        "corpus": hp.mom2_dataset, "n_samples_requested": hp.mom2_n_samples, "n_samples": used,
        "tokens": tokens, "cached": cached})

    def lookup(ls: Sequence[int]) -> list[int]:  # the layers the cache does not give (the others go to out)
        missing = []
        for l in ls:
            found = None
            sizes = [n, hp.mom2_n_samples] if n < hp.mom2_n_samples and corpus.kind == "bundled" else [n]
            for root in stats_roots() if use_cache else ():  # the hparams' stats_dir, then editfast's cache
                for size in sizes:  # a file of the bundled corpus written under the requested size, before the cap
                    if found is None:
                        found = _load_moment(key(l, size, root), d, dtype)
            if found is not None:
                out[l] = found[0]
                record(l, int(found[1]["tokens"]), n, True)
            else:
                missing.append(l)
        return missing

    union = set().union(*dist.gather_objects(lookup(layers)))  # torchrun: every rank runs the same pass
    missing = [l for l in layers if l in union]
    if not missing:
        return out
    # Another process (a second test worker, a parallel run) may be computing the same statistics:
    # one computes them under the lock, the others wait and then read them from the cache.
    # (torchrun's ranks compute together, without it.)
    locking = use_cache and not dist.active()
    tag = cache_tag(corpus.key, n, hp.mom2_max_tokens, hp.mom2_dtype, lm.dtype)
    with cache_lock(files[missing[0]].with_name(f".{tag}.lock")) if locking else nullcontext():
        if locking and not (missing := lookup(missing)):
            return out
        if progress and dist.is_main():
            tqdm.write(computing_line(lm, missing, hp, n, files[missing[0]].parent if use_cache else None),
                       file=sys.stderr)
        return _compute(lm, missing, hp, corpus, n, key, out, record, progress, use_cache, checkpoint_every)


def computing_line(lm, layers: Sequence[int], hp, n: int, where: Path | None) -> str:
    """The line said before statistics are computed: what, why (looked for where, or the model edited since
    it was loaded) and where they will be written."""
    ls = ", ".join(map(str, layers))
    what = (f"statistics of layer{'s' if len(layers) > 1 else ''} {ls} ({hp.mom2_dataset}, {n:,} texts, "
            f"<= {hp.mom2_max_tokens} tokens each, {hp.mom2_dtype})")
    if where is None:
        return f"{what}: computing them (the cache is not used)"
    why = " or ".join(str(r) for r in stats_roots())
    if lm.edited:
        why += f" for these weights ({lm.spec} edited since it was loaded: {lm.weights_fingerprint[:12]})"
    return f"{what} are not in {why}: computing them in one pass, to be written to {where}"


def _compute(lm, missing: list[int], hp, corpus: Corpus, n: int, key, out: dict, record, progress: bool,
             use_cache: bool, checkpoint_every: int) -> dict[int, torch.Tensor]:
    """`second_moments`' pass over the corpus for the ``missing`` layers; adds them to ``out``."""
    dtype = DTYPES[hp.mom2_dtype]
    d = lm.adapter.d_mlp(lm.model)
    files = {l: key(l, n) for l in missing}
    texts = corpus.texts(n)
    if len(texts) < n:  # a hub corpus smaller than asked
        warnings.warn(f"mom2_n_samples={hp.mom2_n_samples} but the corpus {hp.mom2_dataset!r} has {len(texts):,} "
                      f"texts; using {len(texts):,}", UserWarning, stacklevel=3)
        n = len(texts)
        files = {l: key(l, n) for l in missing}
    texts = [texts[i] for i in dist.shard([len(t) for t in texts])]  # torchrun: this rank's texts
    rank = f"rank{dist.rank()}of{dist.world_size()}-" if dist.active() else ""
    partial = files[missing[0]].with_name(f"partial-{rank}{'-'.join(map(str, missing))}-{files[missing[0]].name}")
    resume = _load_partial(partial, missing, d) if use_cache else None
    caching = [use_cache]  # False after the first failed write: the cache is unwritable

    def checkpoint(state: dict) -> None:  # non-finite running sums are never saved
        if caching[0] and all(bool(t.isfinite().all()) for t in state["totals"].values()):
            caching[0] = _save_partial(partial, state)

    t0 = time.perf_counter()
    stats = _one_pass(lm, missing, token_batches(lm.tokenizer, texts, hp.mom2_max_tokens), dtype,
                      progress and dist.is_main(), None, upper=dtype == torch.float32, resume=resume,
                      checkpoint=checkpoint, every=checkpoint_every)
    stats = {l: SecondMoment(dist.all_reduce_sum(s.total), int(dist.all_reduce_sum(torch.tensor(s.count))))
             for l, s in stats.items()}  # torchrun: the ranks' sums (float64), on every rank
    for l, s in stats.items():
        if s.count <= 0:
            raise HParamsError(f"statistics of layer {l}: the corpus {hp.mom2_dataset!r} gave no tokens "
                               f"(mom2_n_samples={hp.mom2_n_samples}, mom2_max_tokens={hp.mom2_max_tokens}); "
                               "C would be 0/0")
        out[l] = s.moment().cpu()
        if not bool(out[l].isfinite().all()):
            bad = int((~out[l].isfinite()).sum())
            raise ModelError(f"statistics of layer {l}: C has {bad} non-finite entries: the model's activations "
                             f"overflow or are non-finite in {lm.dtype} (try a float32 model, mom2_dtype=float64, "
                             "or check the weights)")
        record(l, s.count, n, False)
    for l in stats:
        if caching[0] and dist.is_main():
            caching[0] = write_cache(files[l], lambda tmp, l=l: save_file(
                {"mom2": out[l].contiguous(), "count": torch.tensor(stats[l].count)}, str(tmp),
                metadata=stats_metadata(hp.mom2_dataset, corpus.key, hp.mom2_n_samples, n, hp.mom2_max_tokens,
                                        stats[l].count, seconds=time.perf_counter() - t0)))
    if use_cache and partial.exists():
        try:
            partial.unlink()
        except OSError:
            pass
    dist.barrier()  # torchrun: rank 0 has written the cache
    return out


def stats_metadata(corpus: str, corpus_key: str, requested: int, used: int, max_tokens: int, tokens: int,
                   **extra) -> dict[str, str]:
    """A cache file's metadata: the corpus, the texts asked for and really used, the token cut and count."""
    meta = {"corpus": corpus, "corpus_key": corpus_key, "n_samples": str(used), "n_samples_requested": str(requested),
            "max_tokens": str(max_tokens), "tokens": str(tokens)}
    return {**meta, **{k: f"{v:.2f}" if isinstance(v, float) else str(v) for k, v in extra.items()}}
