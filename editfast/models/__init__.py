"""Layer 2, models: everything that knows how a model is built and where its weights are.

``adapters`` (the table of families: module names, weight orientation), ``archs`` (finding an
adapter by structure for a model not in the table), ``load`` (HF folders, GGUF files, ``random:``
presets, fingerprints), ``hub`` (the local Hugging Face cache), ``placement`` (device maps,
offloaded weights), ``trace`` (hooks on a model's modules), ``update`` (low-rank, dense and sparse
changes to named weights, and applying them). Imports: ``editfast.core``, ``editfast.kernels``.
"""
