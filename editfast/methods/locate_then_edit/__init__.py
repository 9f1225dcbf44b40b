"""The locate-then-edit pipeline that ROME, MEMIT and their successors share: ``locate`` (keys at
the subject's last token), ``targets`` (the batched optimisation of z), ``stats`` and
``stats_files`` (second moments of the keys, all layers in one pass, cached; the originals'
files), ``solve`` (factorised normal equations), ``templates`` (context templates), ``base``
(the LocateThenEdit class and its hyper-parameters), ``post`` (RECT and the norm anchor).
"""
