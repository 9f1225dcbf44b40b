"""Layer 4, the batched inference engine: log-likelihood scoring, greedy generation with a KV
cache, rolling perplexity, length-bucketed across requests (``engine``); the request kinds it
answers (``requests``); padding and the KV cache (``kv``); shared-prefix attention
(``cascade``). Used by the evaluation and by the edit metrics alike. Imports: layers 1-2.
"""
