"""The original ROME/MEMIT/EasyEdit statistics files (``.npz``), into and out of editfast's cache.

The originals save a ``CombinedStat(mom2=SecondMoment())`` state with ``numpy.savez``:

    mom2.constructor   "util.runningstats.SecondMoment()" (a string)
    mom2.count         the number of keys (tokens) summed
    mom2.mom2          Σ k kᵀ, [d, d], in the statistics' precision (not divided by the count)
    sample_size        the number of corpus texts (absent in some copies)

under ``<stats_dir>/<model>/<dataset>_stats/<module>_<precision>_mom2[_t{batch_tokens}][_<n>].npz``,
e.g. ``gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz``. The module
name gives the layer, the folder the corpus, the suffix the number of texts.

``import_npz`` writes C = mom2 / count into editfast's cache under the key a later edit with the
same hyper-parameters (corpus, texts, token cut, precision) and model dtype looks up;
``export_npz`` writes the cached C (computed first if missing) back in the original layout.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from editfast.core.errors import DataError, HParamsError
from editfast.core.paths import atomic_path, io_error
from editfast.methods.locate_then_edit.stats import (
    DTYPES,
    _cache_file,
    corpus_plan,
    second_moments,
    stats_metadata,
)

CONSTRUCTOR = "util.runningstats.SecondMoment()"
_NAME = re.compile(r"^(?P<module>.+?)_(?P<precision>float16|float32|float64)_(?P<stats>[a-z0-9-]+?)"
                   r"(?:_t\{batch_tokens\}|_t\d+)?(?:_(?P<n>\d+))?\.npz$")


def parse_name(path: str | Path) -> dict:
    """What an original statistics file's path says: module, precision and, where present, the corpus
    (``mom2_dataset``) and number of texts (``mom2_n_samples``). {} if the name is not the pattern."""
    p = Path(path)
    m = _NAME.match(p.name)
    if not m:
        return {}
    out = {"module": m["module"], "mom2_dtype": m["precision"]}
    if m["n"]:
        out["mom2_n_samples"] = int(m["n"])
    if p.parent.name.endswith("_stats"):
        out["mom2_dataset"] = p.parent.name.removesuffix("_stats")
    return out


def read_npz(path: str | Path) -> tuple[np.ndarray, int]:
    """Σ k kᵀ and the key count of an original statistics file; DataError (one line) otherwise."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"statistics file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            names = list(z.files)
            mom2, count = (z[k] if k in names else None for k in ("mom2.mom2", "mom2.count"))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read {p} as a .npz file: {' '.join(str(e).split())[:120]}") from None
    if mom2 is None or count is None:
        raise DataError(f"{p} is not a ROME/MEMIT statistics file: it has no 'mom2.mom2' and 'mom2.count' "
                        f"(it has {', '.join(names) or 'nothing'})")
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1] or mom2.dtype.kind != "f":
        raise DataError(f"{p}: mom2.mom2 must be a square float matrix, got {mom2.dtype} {list(mom2.shape)}")
    if count.size != 1 or count.dtype.kind not in "iuf" or not float(count) >= 1 or float(count) != int(count):
        raise DataError(f"{p}: mom2.count must be a positive whole number, got {count.tolist()!r}")
    if not np.isfinite(mom2).all():
        raise DataError(f"{p}: mom2.mom2 has non-finite entries")
    return mom2, int(count)


def file_hparams(path: str | Path) -> dict:
    """The hyper-parameters an original file's name fixes (for the cache key of its import)."""
    info = parse_name(path)
    if info.get("mom2_dtype") == "float16":
        raise DataError(f"{path}: float16 statistics cannot be imported; editfast keeps them in float32 or float64")
    return {k: v for k, v in info.items() if k.startswith("mom2_")}


def layer_of(path: str | Path, lm, layer: int | None) -> int:
    """The layer a file is for: from its module name (checked against --layer), else --layer."""
    module = parse_name(path).get("module")
    n_layers = lm.adapter.num_layers(lm.model)
    if module is not None:
        found = [l for l in range(n_layers) if lm.adapter.rewrite_tmp.format(l) == module]
        if not found:
            raise DataError(f"{path}: the module {module!r} is not an MLP output projection of {lm.spec} "
                            f"({lm.adapter.rewrite_tmp.format('N')})")
        if layer is not None and layer != found[0]:
            raise DataError(f"{path} holds layer {found[0]}'s statistics ({module}), not layer {layer}'s")
        return found[0]
    if layer is None:
        raise DataError(f"{path}: the file name does not name a layer; give --layer")
    if not 0 <= layer < n_layers:
        raise DataError(f"--layer {layer} is out of range for {lm.spec} ({n_layers} layers)")
    return layer


def import_npz(path: str | Path, lm, layer: int | None, hp) -> tuple[int, Path]:
    """Write an original statistics file into editfast's cache for ``lm`` and ``hp``; (layer, cache file)."""

    mom2, count = read_npz(path)
    layer = layer_of(path, lm, layer)
    d = lm.adapter.d_mlp(lm.model)
    if mom2.shape != (d, d):
        raise DataError(f"{path}: statistics of shape {list(mom2.shape)}, but {lm.spec}'s MLP width is {d} "
                        f"(expected [{d}, {d}])")
    corpus, n = corpus_plan(hp)
    C = (torch.from_numpy(np.ascontiguousarray(mom2)).to(torch.float64) / count).to(DTYPES[hp.mom2_dtype])
    target = _cache_file(lm, layer, corpus.key, n, hp.mom2_max_tokens, hp.mom2_dtype)
    meta = stats_metadata(hp.mom2_dataset, corpus.key, hp.mom2_n_samples, n, hp.mom2_max_tokens, count,
                          imported_from=str(Path(path).resolve()))
    try:  # the import is the point: a cache that cannot be written is this command's error, not a warning
        with atomic_path(target) as tmp:
            save_file({"mom2": C.contiguous(), "count": torch.tensor(count)}, str(tmp), metadata=meta)
    except Exception as e:
        if not io_error(e):
            raise
        reason = getattr(e, "strerror", None) or " ".join(str(e).split())
        raise DataError(f"cannot write the statistics cache {target}: {reason}") from None
    return layer, target


def export_npz(lm, layer: int, hp, out: str | Path, progress: bool = False) -> Path:
    """Write editfast's C of ``layer`` (cached, or computed now) as an original statistics file."""

    out = Path(out)
    if out.suffix != ".npz":
        raise HParamsError(f"--out must name a .npz file, got {out}")
    if not 0 <= layer < lm.adapter.num_layers(lm.model):
        raise DataError(f"--layer {layer} is out of range for {lm.spec} ({lm.adapter.num_layers(lm.model)} layers)")
    info: dict = {}
    C = second_moments(lm, [layer], hp, progress=progress, info=info)[layer]
    count = int(info[layer]["tokens"])
    n = info[layer]["n_samples"]
    np_dtype = {"float32": np.float32, "float64": np.float64}[hp.mom2_dtype]
    state = {"mom2.constructor": np.array(CONSTRUCTOR), "mom2.count": np.array(count),
             "mom2.mom2": (C.to(torch.float64) * count).numpy().astype(np_dtype), "sample_size": np.array(n)}
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **state)
        tmp.chmod(0o644)
    return out

