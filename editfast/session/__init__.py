"""Layer 7, runs: ``session`` (EditSession: apply and journal each batch, checkpoints, resume),
``journal`` (the atomic per-batch files), ``outputs`` (run folders as transactions), ``curves``
(curve.json and its plots), ``study`` (a grid of sessions and its report), ``export`` (a run as a
PEFT LoRA adapter). Imports: layers 1-6.
"""
