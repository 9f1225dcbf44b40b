"""MEND (Mitchell et al., 2022, "Fast Model Editing at Scale"): a trained network edits with the gradient.

For a batch of requests, one forward and one backward pass of the edit loss (NLL of " target_new"
after the prompt) give, at every token t and every edited weight W [out, in], the layer input u_t
and the gradient δ_t at its output (∇W = Σ_t δ_t u_tᵀ). A small editor network, trained
beforehand for this model (``editfast train-mend``), maps each (u_t, δ_t) to (ũ_t, δ̃_t) and the
update is ΔW = edit_lr · Σ_t δ̃_t ũ_tᵀ, of rank ≤ the number of tokens: returned as
``LowRank(U = edit_lr · δ̃ᵀ, V = ũᵀ)`` so the session journals and undoes it. The edited weights
are every weight matrix of the MLP blocks of the last three layers (GPT-2: c_fc and c_proj;
GPT-J: fc_in and fc_out; Llama/SmolLM2: gate, up and down projections), found through the model
adapter. The network, its training loop, the decomposition and the original's quirks (normalised
factors, the update *added* with learned rates, shared networks per weight shape with per-layer
scale and shift) are in ``editfast/methods/mend/net.py``.

The network directory comes from ``mend_dir`` (``--mend DIR`` or ``--set mend_dir=DIR``); without
it, the network shipped for the model in ``editfast/_data/mend/<preset>/`` when there is one. A
missing directory, one without a trained network, a corrupt file, or a network trained for another
model (its fingerprint, weight names or shapes) is refused before any weight changes. At edit time
the network's own description (its layers and architecture) decides what is edited; the
hyper-parameters below only shape a network being trained.

Presets: gpt2-xl, gpt-j-6b and llama-2-7b take the original's values (config/alg/mend.yaml and
EasyEdit's hparams/TRAINING/MEND: rank 1920, one hidden layer, identity init, lr 1e-6, edit_lr
1e-4, lr_lr 1e-4, cedit 0.1, cloc 1, gradients accumulated over 10 edits, clip 100, one edit per
iteration; layers 45-47, 25-27 and 29-31). Those values train for tens of thousands of iterations
on a GPU. The "smollm2-135m" preset is for training on a CPU in under an hour:

- rank 32 (not 1920: the shipped network is 2.5 MB, 625k parameters for SmolLM2's two weight
  shapes, 576x1536 for gate/up and 1536x576 for down, each network shared by its 6 or 3 weights);
- Adam lr 1e-4 with no gradient accumulation (1e-6 over 10-edit accumulations learns nothing in a
  few thousand iterations), cloc 5, validation every 100 iterations on 25 edits, 3,000 iterations.
- the locality KL at every token of the locality prompt (the original's decoder-only setting,
  ``loc_kl_positions="all"``), not at the answer positions only (EasyEdit's CounterFact loader).
- How these were chosen (the settings tried on the last 50 requests of counterfact-train and
  what they measured): bench/RESULTS.md ("MEND: the SmolLM2 preset").
- The shipped network ``editfast/_data/mend/smollm2-135m/`` is ``editfast train-mend --model
  smollm2-135m --data counterfact-train --steps 3000 --seed 0`` with this preset, one torch thread
  (OMP_NUM_THREADS=1); its mend.json records the rest (validation losses, the iteration kept,
  held-out success, versions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from editfast.core.errors import HParamsError
from editfast.core.paths import PACKAGE_DATA
from editfast.methods.base import Method, State
from editfast.methods.hparams import HParams, preset_name_for
from editfast.methods.mend.net import (
    MENDFileError,
    edit_updates,
    load_net,
    mlp_sites,
    read_meta,
)

BUNDLED = PACKAGE_DATA / "mend"


@dataclass
class MENDHyperParams(HParams):
    mend_dir: str | None = None  # a trained network (train-mend --out DIR); None: the one shipped for the model
    # the editor network (the original's config/alg/mend.yaml)
    n_hidden: int = 1
    rank: int = 1920
    init: str = "id"
    norm: bool = True
    combine: bool = True
    x_only: bool = False
    delta_only: bool = False
    one_sided: bool = False
    shared: bool = True
    mlp_class: str = "IDMLP"
    act: str = "relu"
    # training (the original's config.yaml and alg/mend.yaml)
    edit_lr: float = 1e-4
    lr_lr: float = 1e-4
    lr: float = 1e-6
    cedit: float = 0.1
    cloc: float = 1.0
    accumulate_bs: int = 10
    grad_clip: float = 100.0
    train_batch_size: int = 1  # edits per training iteration (the original's batch_size / n_edits)
    val_interval: int = 5000  # validate every this many iterations; the best network is kept
    val_steps: int = 500  # validation edits (the last val_steps x train_batch_size training requests); 0: none
    loc_kl_positions: str = "all"  # the locality KL at every token ("all", the original) or the answer's ("answer")

    RANGES: ClassVar[dict] = {
        "n_hidden": ">= 0", "rank": ">= 1", "init": ("id", "xavier"), "mlp_class": ("IDMLP",), "act": ("relu",),
        "lr_lr": ">= 0", "lr": ">= 0", "cedit": ">= 0", "cloc": ">= 0", "accumulate_bs": ">= 1",
        "grad_clip": "> 0", "train_batch_size": ">= 1",
        "val_interval": ">= 1", "val_steps": ">= 0", "loc_kl_positions": ("all", "answer"),
    }

    def validate(self) -> None:
        super().validate()
        if self.combine and (self.one_sided or self.x_only or self.delta_only):
            raise HParamsError("hparams: MEND's combine cannot be used with one_sided, x_only or delta_only")
        if self.mend_dir is not None and not self.mend_dir.strip():
            raise HParamsError("hparams: mend_dir must name a directory, got an empty string")


@dataclass
class MENDState(State):
    net: Any = None  # the loaded editor network (not journaled: it does not change)
    meta: dict = field(default_factory=dict)


_ORIGINAL = dict(n_hidden=1, rank=1920, init="id", norm=True, combine=True, shared=True, lr=1e-6, edit_lr=1e-4,
                 lr_lr=1e-4, cedit=0.1, cloc=1.0, accumulate_bs=10, grad_clip=100.0, train_batch_size=1,
                 val_interval=5000, val_steps=500)


class MEND(Method):
    name = "mend"
    summary = "a trained editor network turns the edit's gradient into a low-rank update (Mitchell et al., 2022)"
    hparams_class = MENDHyperParams
    presets = {
        "gpt2-xl": dict(layers=[45, 46, 47], **_ORIGINAL),
        "gpt-j-6b": dict(layers=[25, 26, 27], **_ORIGINAL),
        "llama-2-7b": dict(layers=[29, 30, 31], **_ORIGINAL),
        "smollm2-135m": dict(layers=[27, 28, 29], **{**_ORIGINAL, "rank": 32, "lr": 1e-4, "accumulate_bs": 1,
                                                     "cloc": 5.0, "val_interval": 100, "val_steps": 25}),
        "tiny": dict(layers=[1, 2, 3], **{**_ORIGINAL, "rank": 8, "lr": 1e-3, "accumulate_bs": 2, "val_interval": 3,
                                          "val_steps": 2}),
    }
    default_batch_size = 1  # the networks are trained on one edit at a time
    trained_network = True

    def network_dir(self, lm, hp) -> Path:
        """hp.mend_dir, else the network shipped for the model's preset; MENDFileError if neither."""
        if hp.mend_dir is not None:
            return Path(hp.mend_dir).expanduser()
        preset = preset_name_for(lm.spec, lm.model.config)
        shipped = BUNDLED / preset if preset else None
        if shipped is not None and (shipped / "mend.json").is_file():
            return shipped
        raise MENDFileError(f"MEND needs an editor network trained for {lm.spec} and none is shipped for it: train one "
                            "with 'editfast train-mend --model M --data counterfact-train --out DIR' and pass "
                            "--mend DIR (or --set mend_dir=DIR)")

    def _meta(self, lm, hp) -> tuple[Path, dict]:
        d = self.network_dir(lm, hp)
        doc = read_meta(d)
        if doc["model_fingerprint"] != lm.fingerprint:
            raise MENDFileError(f"the MEND network in {str(d)!r} was trained for another model "
                                f"({doc.get('model', '?')}, fingerprint {doc['model_fingerprint'][:12]}...), "
                                f"not {lm.spec} ({lm.fingerprint[:12]}...)")
        return d, doc

    def sites(self, lm, hp) -> list[str]:
        """The weights the trained network edits (its layers' MLP matrices)."""
        _, doc = self._meta(lm, hp)
        return [s.weight for s in mlp_sites(lm, doc["layers"])]

    def prepare(self, lm, hp, progress: bool = True) -> State:
        d, _ = self._meta(lm, hp)
        net, meta = load_net(lm, d)
        return MENDState(net=net, meta={"mend_dir": str(d), **{k: meta.get(k) for k in ("model", "data", "steps")}})

    def edit(self, lm, requests, hp, state, templates, *, targets=None, trace=None, backend="fast", progress=False):
        if getattr(state, "net", None) is None:  # a caller's plain State: load the network now
            state = self.prepare(lm, hp, progress)
        updates = edit_updates(lm, state.net, list(requests))
        if trace is not None:
            trace.update(mend_dir=state.meta.get("mend_dir"), ranks=[u.rank for u in updates])
        yield updates


METHOD = MEND()
