"""editfast: fast locate-then-edit knowledge editing (ROME, MEMIT) and its side effects.

    import editfast
    lm = editfast.load_model("smollm2-135m")
    requests = editfast.load_dataset("counterfact", n=10)
    result = editfast.edit(lm, requests, method="memit")

Names are imported lazily, so ``import editfast`` (and the CLI's --help) stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models", "LoadedModel": "models", "supported_architectures": "models",
    "random_presets": "models",
    "Request": "data", "load_dataset": "data", "validate_requests": "data", "dataset_names": "data",
    "ROMEHyperParams": "methods.rome", "MEMITHyperParams": "methods.memit", "resolve_hparams": "hparams",
    "make_hparams": "hparams",
    "LowRank": "update", "Dense": "update", "Sparse": "update", "apply_update": "update", "snapshot": "update",
    "restore": "update", "validate_updates": "update", "load_journal": "api",
    "EditSession": "session", "METHODS": "methods", "get_method": "methods",
    "second_moments": "stats", "accumulate_second_moments": "stats",
    "counterfact_metrics": "metrics", "zsre_metrics": "metrics", "score_continuations": "metrics",
    "edit": "api", "EditResult": "session", "context_templates": "templates",
    "EditfastError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'editfast' has no attribute {name!r}")
