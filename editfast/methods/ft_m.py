"""FT-M (EasyEdit's masked fine-tuning; Zhang et al., 2024): FT-L's loop (``ft.py``) with the
standard teacher-forced loss on prompt + target, the prompt's tokens masked out of it —
EasyEdit's ``alg_name: FT`` with ``objective_optimization: target_new``.

Presets: ``gpt2-xl``, ``gpt-j-6b``, ``llama-2-7b``: EasyEdit's ``hparams/FT`` files (gpt2-xl.yaml,
gpt-j-6B.yaml, llama-7b.yaml) with ``target_new`` (EasyEdit ships no separate FT-M files; its
survey runs these with the objective switched); ``smollm2-135m``: tuned on held-out facts
(``bench/tune_ft.py``; docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editfast.methods.ft import FT, FTHyperParams


@dataclass
class FTMHyperParams(FTHyperParams):
    objective_optimization: str = "target_new"

    OBJECTIVE: ClassVar[str] = "target_new"


class FTM(FT):
    name = "ft-m"
    summary = "fine-tuning of the MLP output projection on the target tokens, prompt masked (EasyEdit's FT-M)"
    hparams_class = FTMHyperParams
    presets = {
        "gpt2-xl": dict(layers=[0], num_steps=25, lr=5e-4, weight_decay=0.0, kl_factor=0.0, norm_constraint=5e-4,
                        batch_size=3),
        "gpt-j-6b": dict(layers=[21], num_steps=25, lr=5e-4, weight_decay=0.0, kl_factor=0.0,
                         norm_constraint=False, batch_size=1),
        "llama-2-7b": dict(layers=[21], num_steps=25, lr=5e-4, weight_decay=0.0, kl_factor=0.0,
                           norm_constraint=False, batch_size=1),
        "smollm2-135m": dict(layers=[0], num_steps=25, lr=5e-4, weight_decay=0.0, kl_factor=0.0,
                             norm_constraint=False, batch_size=64),
        "tiny": dict(layers=[1], num_steps=10, lr=1e-2, norm_constraint=False, batch_size=2),
    }


METHOD = FTM()
