"""General-ability evaluation: eight task categories plus WikiText perplexity on one batched engine."""
