"""editfast: fast knowledge editing of causal LMs (ROME, MEMIT, AlphaEdit, EMMET, PMET, KN, MEND,
UltraEdit ...) and measurement of what the edits cost the model.

    import editfast
    lm = editfast.load_model("smollm2-135m")
    requests = editfast.load_dataset("counterfact", n=10)
    result = editfast.edit(lm, requests, method="memit")

Names are imported lazily, so ``import editfast`` (and the CLI's --help) stays fast.
"""

from importlib import import_module

from editfast.core.compat import VERSION as __version__  # noqa: F401

_EXPORTS = {
    "load_model": "models.load", "LoadedModel": "models.load", "supported_architectures": "models.adapters",
    "random_presets": "models.load",
    "Request": "data.requests", "load_dataset": "data.requests", "validate_requests": "data.requests",
    "dataset_names": "data.requests",
    "ROMEHyperParams": "methods.rome", "MEMITHyperParams": "methods.memit", "resolve_hparams": "methods.registry",
    "make_hparams": "methods.registry",
    "LowRank": "models.update", "Dense": "models.update", "Sparse": "models.update", "apply_update": "models.update",
    "snapshot": "models.update", "restore": "models.update", "validate_updates": "models.update",
    "load_journal": "api",
    "EditSession": "session.session", "METHODS": "methods.registry", "get_method": "methods.registry",
    "second_moments": "methods.locate_then_edit.stats", "accumulate_second_moments": "methods.locate_then_edit.stats",
    "counterfact_metrics": "eval.edit_metrics", "zsre_metrics": "eval.edit_metrics",
    "score_continuations": "eval.edit_metrics",
    "edit": "api", "EditResult": "session.session", "context_templates": "methods.locate_then_edit.templates",
    "EditfastError": "core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'editfast' has no attribute {name!r}")
