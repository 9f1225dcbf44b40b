"""The locate-then-edit method: targets z for all facts of a batch together (``targets``), then per
edited layer, bottom-up on the model as edited so far: keys, ``solve`` -> update, post-process,
yielded (the session applies it before the next layer's keys are read). Its statistics (second
moments per layer, in ``LocateState``), generated context templates and the rewrite module's
sites are the defaults of this pipeline, not of ``Method``.
MEMIT, ROME, r-ROME, EMMET and AlphaEdit override ``solve`` (AlphaEdit its state after a batch);
PMET ``optimize`` too (two sites optimised together). ``LocateHParams`` are their
hyper-parameters, with the post-processes every such method offers (``rect``, ``norm_anchor``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from editfast.core.errors import HParamsError
from editfast.methods.base import Method, State
from editfast.methods.hparams import HParams
from editfast.methods.locate_then_edit.locate import LayerwiseReader, word_activations
from editfast.methods.locate_then_edit.post import norm_anchor, rect
from editfast.methods.locate_then_edit.solve import Moment
from editfast.methods.locate_then_edit.stats import second_moments
from editfast.methods.locate_then_edit.targets import optimize_targets
from editfast.methods.locate_then_edit.templates import context_templates
from editfast.models.archs import through_post_norm
from editfast.models.update import Update

# Module-name keys of the original hparams files. Accepted for drop-in compatibility and
# checked against the adapter; they never override it.
MODULE_KEYS = {
    "rewrite_module_tmp": "rewrite_tmp",
    "layer_module_tmp": "layer_tmp",
    "mlp_module_tmp": "mlp_tmp",
    "attn_module_tmp": "attn_tmp",
    "ln_f_module": "final_norm",
    "lm_head_module": None,  # the original uses the tied embedding or lm_head; we read the head
}


@dataclass
class LocateHParams(HParams):
    """Hyper-parameters of a locate-then-edit method, under the original ROME/MEMIT names (targets
    ``v_*``, statistics ``mom2_*``), with its optional post-processes of each update:

    rect         RECT (Gu et al., 2024): keep this fraction of ΔW's entries, those with the largest
                 relative change |ΔW / W|, and zero the rest (the update is then ``Sparse``); None: off.
    norm_anchor  hold every edited matrix's Frobenius norm to its value before the session's first
                 edit: W + ΔW is rescaled to that norm (the update is then ``Dense``).
    """

    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int = -1  # -1: the model's last layer
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True
    mom2_dataset: str = "wikitext"
    mom2_n_samples: int = 1000
    mom2_dtype: str = "float32"
    mom2_max_tokens: int = 128  # each corpus text is cut at this many tokens
    # Original module-name keys (validated against the adapter, see MODULE_KEYS).
    rewrite_module_tmp: str | None = None
    layer_module_tmp: str | None = None
    mlp_module_tmp: str | None = None
    attn_module_tmp: str | None = None
    ln_f_module: str | None = None
    lm_head_module: str | None = None
    rect: float | None = None
    norm_anchor: bool = False

    RANGES: ClassVar[dict] = {
        "fact_token": ("subject_last",), "v_num_grad_steps": ">= 1", "v_lr": "> 0", "v_loss_layer": ">= -1",
        "v_weight_decay": ">= 0", "clamp_norm_factor": "> 0", "kl_factor": ">= 0", "mom2_n_samples": ">= 1",
        "mom2_dtype": ("float32", "float64"), "mom2_max_tokens": ">= 1", "rect": "> 0 and <= 1",
    }
    LAYER_KEYS: ClassVar[tuple[str, ...]] = ("layers", "v_loss_layer")

    def loss_layer(self, n_layers: int) -> int:
        """The layer whose output gives the target loss (the original uses max(v_loss_layer, layer))."""
        last = n_layers - 1 if self.v_loss_layer < 0 else self.v_loss_layer
        return max(last, max(self.layers))

    def check_modules(self, adapter: Any) -> None:
        """Raise if a module-name key names other modules than the model adapter does."""
        for key, attr in MODULE_KEYS.items():
            given = getattr(self, key)
            if given is None or attr is None:
                continue
            if given != getattr(adapter, attr):
                raise HParamsError(
                    f"hparams: {key}={given!r} does not match the model ({getattr(adapter, attr)!r})"
                )


@dataclass
class LocateState(State):
    """A locate-then-edit method's state: the statistics C of each edited layer, factorised once."""

    moments: dict[int, Moment] = field(default_factory=dict)

    def solve_reports(self) -> list[dict]:
        return [r for m in self.moments.values() for r in m.reports]


@dataclass
class LayerInputs:
    """What the pipeline hands ``solve`` for one layer (keys are columns)."""

    layer: int
    index: int  # position of ``layer`` in hp.layers
    keys_per_template: torch.Tensor  # [n, T, d_in] rewrite-module inputs at the subject's last token
    keys: torch.Tensor  # [d_in, n] mean within each template group, then over the groups
    outs_per_template: torch.Tensor  # [n, T, d_out] rewrite-module outputs there
    k_bare: torch.Tensor  # [d_in, n] the bare prompt's key
    w_k_bare: torch.Tensor  # [d_out, n] the rewrite module's output at the bare prompt
    cur: torch.Tensor  # [d_z, n] the target site's output at the bare prompt
    targets: torch.Tensor  # [d_z, n] z (v*)


class LocateThenEdit(Method):
    """Targets z for all facts of a batch together, then per edited layer (bottom-up, on the model
    as edited so far): keys, ``solve`` -> update, post-process, yield."""

    hparams_class: ClassVar[type[HParams]] = LocateHParams
    locate_then_edit = True
    template_shape: ClassVar[str] = "groups"  # see templates.context_templates
    target_site: ClassVar[str] = "layer"  # "layer" (decoder-layer output of the last layer) or "mlp"

    def templates(self, lm, hp, seed: int = 0, mode: str = "generated", progress: bool = False) -> list[list[str]]:
        return context_templates(lm, self.template_shape, hp, seed, mode, progress)

    def sites(self, lm, hp) -> list[str]:
        """The rewrite module's weight at each edited layer."""
        return [f"{lm.adapter.rewrite_tmp.format(l)}.weight" for l in hp.layers]

    def needs_statistics(self, hp) -> bool:
        return True

    def prepare(self, lm, hp, progress: bool = True) -> LocateState:
        """The second moments C of every edited layer (from the cache, else computed)."""
        info: dict[int, dict] = {}
        stats = second_moments(lm, hp.layers, hp, progress=progress, info=info) if self.needs_statistics(hp) else {}
        return LocateState(moments={l: Moment(C) for l, C in stats.items()}, statistics=info)

    def z_site(self, lm, hp) -> tuple[str, int]:
        layer = hp.layers[-1]
        tmp = lm.adapter.layer_tmp if self.target_site == "layer" else lm.adapter.mlp_tmp
        return tmp.format(layer), layer

    def solve(self, lm, x: LayerInputs, hp, state: LocateState, backend: str, trace: dict) -> Update:
        raise NotImplementedError

    def postprocess(self, lm, update: Update, hp, state: State) -> Update:
        """RECT, then the norm anchor, where ``hp`` asks for them (see ``LocateHParams``)."""
        if getattr(hp, "rect", None) is not None:
            update = rect(lm, update, hp.rect)
        if getattr(hp, "norm_anchor", False):
            update = norm_anchor(lm, update, state)
        return update

    def trace_targets(self, trace: dict, init: torch.Tensor, delta: torch.Tensor, losses: list) -> None:
        trace.update(target_init=init, z_delta=delta, losses=losses)

    def edit(self, lm, requests, hp, state, templates, *, targets=None, trace=None, backend="fast", progress=False):
        trace = {} if trace is None else trace
        requests = list(requests)
        size = self.max_batch_size or len(requests)
        for s in range(0, len(requests), size):
            step = trace if len(requests) <= size else {}
            given = None if targets is None else targets[:, s: s + size]
            yield from self._edit_chunk(lm, requests[s: s + size], hp, state, templates, given, step, backend,
                                        progress)
            if step is not trace:
                trace["targets_s"] = trace.get("targets_s", 0.0) + step.get("targets_s", 0.0)

    def optimize(self, lm, requests, hp, templates: list[list[str]], trace: dict | None = None, backend: str = "fast",
                 progress: bool = False) -> torch.Tensor:
        """The targets z [d_model, n] of ``requests`` at :meth:`z_site` (all requests optimised in one
        batch on the fast backend); ``trace`` receives the initial values, deltas, losses and seconds."""
        trace = {} if trace is None else trace
        flat = [t for g in templates for t in g]
        z_site, z_layer = self.z_site(lm, hp)
        t0 = time.perf_counter()
        loss_layer = hp.loss_layer(lm.adapter.num_layers(lm.model))
        res = optimize_targets(lm, list(requests), hp, flat, z_site, z_layer, loss_layer, backend=backend,
                               progress=progress)
        trace["targets_s"] = trace.get("targets_s", 0.0) + time.perf_counter() - t0
        self.trace_targets(trace, torch.stack([x.target_init for x in res], 1),
                           torch.stack([x.delta for x in res], 1), [x.losses for x in res])
        return torch.stack([x.target for x in res], 1)

    def _edit_chunk(self, lm, requests, hp, state, templates, targets, trace, backend, progress):
        adapter = lm.adapter
        flat = [t for g in templates for t in g]
        z_site, _ = self.z_site(lm, hp)
        if targets is None:
            targets = self.optimize(lm, requests, hp, templates, trace, backend, progress)
        n = len(requests)
        read = self.reader(lm, requests, flat, backend)
        for i, layer in enumerate(hp.layers):
            rewrite = adapter.rewrite_tmp.format(layer)
            tpl = read(0, layer, inputs=[rewrite], outputs=[rewrite])
            bare = read(1, layer, inputs=[rewrite], outputs=list(dict.fromkeys([rewrite, z_site])))
            raw = tpl[("in", rewrite)].float().reshape(n, len(flat), -1)
            x = LayerInputs(layer, i, raw, group_mean_keys(raw, templates).T,
                            tpl[("out", rewrite)].float().reshape(n, len(flat), -1),
                            bare[("in", rewrite)].float().T, bare[("out", rewrite)].float().T,
                            bare[("out", z_site)].float().T.to(raw.device), targets.to(raw.device))
            if adapter.mlp_out_norm and z_site == adapter.layer_tmp.format(hp.layers[-1]):
                x = post_norm_targets(lm, x, len(hp.layers) - i)
            yield [self.postprocess(lm, self.solve(lm, x, hp, state, backend, trace), hp, state)]

    @staticmethod
    def reader(lm, requests, flat: list[str], backend: str):
        """read(which, layer, inputs=, outputs=): activations at the subject's last token of every
        (request, template) prompt (which=0) or of the bare prompts (which=1)."""
        ctx = [t.replace("{}", r.prompt, 1) for r in requests for t in flat]
        ctx_subjects = [r.subject for r in requests for _ in flat]
        prompts, subjects = [r.prompt for r in requests], [r.subject for r in requests]
        if backend == "fast":  # each pass starts at the layer edited last (see LayerwiseReader)
            readers = LayerwiseReader(lm, ctx, ctx_subjects), LayerwiseReader(lm, prompts, subjects)
            return lambda which, layer, **kw: readers[which].read(layer, **kw)
        texts = (ctx, ctx_subjects), (prompts, subjects)
        return lambda which, layer, **kw: word_activations(lm, *texts[which], **kw)


def post_norm_targets(lm, x: LayerInputs, left: int) -> LayerInputs:
    """``x`` with targets and current values moved into the MLP output space of layer ``x.layer``
    where a norm sits between the MLP and the residual stream (Gemma-2, OLMo-2): this layer's share
    (targets − cur) / ``left`` of the residual-stream change becomes the MLP-output change that
    moves the norm's output that way (``archs.through_post_norm``), so that a solve's
    (targets − cur) / left is that change. Without the mapping a residual-space delta added to the
    MLP output is rescaled by the norm and barely moves the model."""
    norm = lm.model.get_submodule(lm.adapter.mlp_out_norm.format(x.layer))
    m = x.w_k_bare
    moved = through_post_norm(norm, m, (x.targets.to(m.device) - x.cur) / left)
    return dataclasses.replace(x, cur=m, targets=m + left * (moved - m))


def group_mean_keys(keys: torch.Tensor, groups: Sequence[Sequence[str]]) -> torch.Tensor:
    """[n, n_templates, d] -> [n, d]: mean within each template group, then mean of the groups."""
    out, start = [], 0
    for g in groups:
        out.append(keys[:, start: start + len(g)].mean(1))
        start += len(g)
    return torch.stack(out, 1).mean(1)
