"""Version differences of the dependencies: the KV cache's keyword, and the versions a result records.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old keyword still works there,
with a deprecation warning, until 5.40; outputs carry the cache as ``.cache``). Earlier versions
only know ``past_key_values``. editfast passes and reads the cache through these two helpers,
which use whichever name the installed transformers (and the model class) declares.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import platform
from importlib.metadata import PackageNotFoundError, version

VERSION = "0.1.0"  # editfast's; pyproject.toml carries the same


@functools.cache
def _cache_kw(cls: type) -> str:
    """``"cache"`` where ``cls.forward`` declares it (inspect follows the deprecation wrappers to
    the real signature), else ``"past_key_values"``."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - no inspectable signature
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """The keyword argument that passes ``cache`` (or None) to ``model``'s forward."""
    return {_cache_kw(type(model)): cache}


def output_cache(out):
    """The cache returned in a model output, under its new name ``cache`` or its old one."""
    fields = {f.name for f in dataclasses.fields(out)} if dataclasses.is_dataclass(out) else set(out.keys())
    return out.cache if "cache" in fields else out.past_key_values


def versions(device=None) -> dict:
    """Software versions and the device, recorded in every result file."""

    import torch  # torch: core stays torch-free (``import editfast``, ``editfast --help``)

    out = {"python": platform.python_version(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    for pkg in ("editfast", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover - a source checkout without metadata
            out[pkg] = None
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
        try:
            name = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        out["device"] = f"{dev.type}: {name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return out
