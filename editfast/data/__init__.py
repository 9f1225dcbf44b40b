"""Layer 3, data: the edit requests (CounterFact, zsRE, MQuAKE, a user's file) and the text corpus
the statistics are computed on. Imports: layers 1-2.
"""
