"""Hugging Face Hub ids (`Qwen/Qwen3-0.6B`) resolved from the local HF cache, never the network.

    path = hub_snapshot("Qwen/Qwen3-0.6B")   # <cache>/models--Qwen--Qwen3-0.6B/snapshots/<commit>

The cache is $HF_HUB_CACHE, else $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
$XDG_CACHE_HOME/huggingface/hub (~/.cache/huggingface/hub), read when called (huggingface_hub's
own constant is fixed at import). `id@revision` picks a branch, tag or commit cached there.
"""

from __future__ import annotations

import re
from pathlib import Path

from editfast.core.errors import ModelError
from editfast.core.paths import hf_cache

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")


def hub_cache_dir() -> Path:
    return hf_cache("hub", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")


def is_hub_id(spec: str) -> bool:
    """`org/name` (optionally `@revision`) that is not an existing local path."""
    return bool(HUB_ID.match(spec)) and not Path(spec).expanduser().exists()


def hub_snapshot(spec: str) -> Path:
    """The cached snapshot directory of the Hub id `spec`, with local_files_only (no network)."""
    from huggingface_hub import snapshot_download  # only Hub ids need it
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError  # (idem)

    repo_id, _, revision = spec.partition("@")
    cache = hub_cache_dir()
    try:
        path = Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as e:
        if not isinstance(e, (LocalEntryNotFoundError, HFValidationError, FileNotFoundError)):
            raise
        raise ModelError(f"model {spec!r} is neither a local path nor in the local Hugging Face cache "
                         f"{str(cache)!r} (editfast never downloads): run `hf download {repo_id}` where there is "
                         "network and set HF_HUB_CACHE/HF_HOME to that cache, or pass a model directory") from None
    if not (path / "config.json").is_file():
        raise ModelError(f"the cached snapshot of {spec!r} ({str(path)!r}) has no config.json: not a "
                         f"transformers model, or only partly downloaded (`hf download {repo_id}`)")
    return path
