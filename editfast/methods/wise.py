"""WISE (Wang et al., NeurIPS 2024): a side memory beside one MLP weight, routed by activation.

The base weights never change. One weight W of the model (the edited layer's MLP output
projection by default: Llama's ``down_proj``) gets a *side memory* W', a copy of W at the start
of every shard. An edit trains W' alone, by masked SGD, so that at that layer

    Δ_W'(x) = mean over x's tokens t of ‖act(W' a_t) − act(W a_t)‖₂

(a_t the module's input at token t, act the model's hidden activation function applied to the
module's output, as the original code does) is large on the edit's prompts and small on unrelated
text, while the model with W' in place of W says the new target. At inference every sequence is
routed on its own: its output at that layer is W's unless a side memory's Δ clears that memory's
threshold (act_ratio × the smallest in-scope Δ its edits reached in training); among the memories
that do, the one with the largest Δ answers (top-1 activation).

What the original (EasyEdit ``easyeditor/models/wise``: WISE.py, utils.py, merge/; the authors'
code is that folder; hparams/WISE/*.yaml) does, reproduced here, quirks included:

- W1 the edit batch: the request's prompt (subject filled) + " " + target under 11 context
  templates — "{}" and ten greedy continuations (5 and 10 new tokens) of "I", "You", "Because",
  "Yes", "Q: " — plus one unrelated ("loc") text. The original takes that text from zsRE's training
  questions with their answers; here (``loc_corpus``) the request number (edits so far mod 1000) of
  CounterFact's training split, its prompt and true answer (disjoint from the evaluation
  records), or a text of a corpus (``wikitext``), cut to ``loc_tokens`` tokens.
- W2 the target loss (``objective_optimization: only_label``): per template row the summed
  cross-entropy of the target tokens divided by (target tokens + 1) — the original's label mask
  starts one position before the first target prediction, at an ignored label — averaged over rows.
- W3 the activation loss (the paper's Eq. 5, "general editing": the loc text is not the subject):
  with Δ_in the 11 template rows' Δ and Δ_out the loc row's,
  L_a = mean₊(Δ_out − Δ_in + γ) + mean₊(Δ_out − α) + mean₊(β − Δ_in), mean₊ the mean of the
  positive entries only (0 when none); act_margin = [α, β, γ]. Total loss: target + activation.
- W4 the step: SGD on W' with lr ``edit_lr`` and weight decay 1e-5 (the decay reaches every entry
  of W', the gradient only the shard's mask), then W' clamped to W ± ``norm_constraint``; at most
  ``n_iter`` steps, stopping early when the loss changed by ≤ 1e-4 and is ≤ 0.02.
- W5 the recorded activation of an edit: the mean over template rows of Δ_in at the forward of the
  last iteration (before its step); a memory's threshold is act_ratio × the smallest recorded over
  its edits.
- W6 knowledge sharding: a Bernoulli(``mask_ratio``) gradient mask per shard of ``save_freq``
  edits; after every ``save_freq`` edits W' joins the memories and a new shard starts from W.
  After every ``merge_freq`` edits the last merge_freq/save_freq memories are merged (``merge_alg``,
  TIES by default: magnitude top-``densities``, sign consensus by sum, normalised, weights
  ``weights``/n) into one memory whose threshold is the smallest of theirs (WISE-Retrieve,
  ``retrieve: true``, every shipped file); with ``retrieve: false`` (WISE-Merge) the memories are
  merged into one merged weight (first merge: weights/n each; later ones 0.4/n each and 0.6 for the
  merged weight so far), routed against W' by the rule: both below threshold → W, else the larger Δ.
- W7 routing: a row's Δ is the mean over its tokens, the max for a row over 100 tokens; the
  working W' competes first (W' if Δ ≥ its threshold, else W), then each memory in order, which
  wins if its Δ exceeds both the best so far and its own threshold.

Deviations, and why:

- Rows are right-padded with an attention mask, and every Δ is over a row's real tokens; the
  original averages over padded positions too (its evaluation runs one example at a time, where
  both agree). Inference routes each row of a batch on its own (the original's ``.item()`` allows a
  batch of one), so the evaluation engine runs routed models batched.
- The prompt (with the tokenizer's special tokens) and " " + target (without) are tokenised apart and
  joined; the original tokenises "prompt target" as one string (the same tokens for a BPE whose
  words carry their leading space, as SmolLM2's and Llama's).
- The evaluation engine scores a sequence as context + continuation without its last token (that
  token predicts nothing), so Δ at evaluation leaves it out; EasyEdit's teacher-forced evaluation
  feeds it too.
- The evaluation-time merge of the original's WISE-Merge ``__call__`` (an unfinished shard merged in
  when the model is next called) is not done: evaluating never changes the state.
- Masks and DARE's random drops come from a generator seeded by ``mask_seed`` and the shard (or
  merge) number, not numpy's global state, so resume and undo are exact.
- A bias of the edited module (GPT-J's ``fc_out``) is added to the side memory's output too (the
  original drops it for every family but GPT-2).
- Not implemented: ``replay`` (the paper's Appendix B.3), ``use_chat_template`` and ``slerp`` (each
  refused in one line); the subject-masked ("factual editing") activation loss, which the original
  takes when the loc prompt is the request's subject (never here: the loc text is another request's);
  EasyEdit's batch editing (``max_batch_size`` 1: one edit per batch, as its sequential editing).

State (``State.tensors``, journaled by the session): ``side`` (W'), ``mask``, ``count`` (edits so
far), ``side_min`` (the shard's smallest recorded activation, 1e9 when none), ``memories`` (their
number) with ``memory.{i}`` and ``memory.{i}.min``, and ``merged`` (WISE-Merge).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from editfast.core.errors import EditfastError, HParamsError
from editfast.data.corpus import corpus_texts
from editfast.data.requests import load_dataset
from editfast.engine.kv import right_pad
from editfast.methods.base import Method, State
from editfast.methods.hparams import HParams, check_inner_params, inner_params_module
from editfast.methods.locate_then_edit.targets import target_text
from editfast.methods.mend.net import Above, TokenBatch
from editfast.models import routing
from editfast.models.archs import output_logits
from editfast.models.routing import (
    ACTS,
    SideMemory,
    linear_out,
    row_score,
    token_distance,
)
from editfast.models.trace import Trace

NO_ACT = 1e9  # the original's EditingMeanAct before any edit: no threshold is reached
WEIGHT_DECAY = 1e-5  # the original's SGD weight decay
STARTERS = ["I", "You", "Because", "Yes", "Q: "]
TEMPLATE_LENGTHS = (5, 10)  # new tokens of the generated templates (length_params [[5, 5], [10, 5]])
N_LOC = 1000  # loc texts cycled through

MERGES = ("ties", "magnitude_norm", "magnitude", "sign", "dare_ties", "dare_linear", "linear")


@dataclass
class WISEHyperParams(HParams):
    # the edited weight: "rewrite" (the MLP output projection) or a dotted name under the decoder
    # layer of ``layers`` (one layer); EasyEdit's inner_params (e.g. model.layers[27].mlp.down_proj.weight) sets both
    layers: list[int] = field(default_factory=list)
    module: str = "rewrite"
    inner_params: list[str] | None = None
    edit_lr: float = 1.0
    n_iter: int = 70
    mask_ratio: float = 0.2
    act_margin: list[float] = field(default_factory=lambda: [5.0, 20.0, 10.0])  # α, β, γ
    act_ratio: float = 0.88
    norm_constraint: float | None = 1.0
    save_freq: int = 500
    merge_freq: int = 1000
    merge_alg: str = "ties"
    densities: float = 0.53
    weights: float = 1.0
    retrieve: bool = True
    replay: bool = False
    objective_optimization: str = "only_label"
    use_chat_template: bool = False
    loc_corpus: str = "counterfact-train"  # or a statistics corpus (wikitext, a file)
    loc_tokens: int = 24
    mask_seed: int = 0

    RANGES: ClassVar[dict] = {
        "edit_lr": "> 0", "n_iter": ">= 1", "mask_ratio": "> 0 and <= 1", "act_margin": ">= 0", "act_ratio": "> 0",
        "norm_constraint": "> 0", "save_freq": ">= 1", "merge_freq": ">= 1", "merge_alg": MERGES,
        "densities": "> 0 and <= 1", "weights": "> 0", "objective_optimization": ("only_label",),
        "loc_tokens": ">= 1", "mask_seed": ">= 0",
    }

    def validate(self) -> None:
        if self.inner_params:  # EasyEdit's name of the edited weight decides the layer and the module
            layer, self.module = inner_params_module(self.inner_params, "WISE")
            self.layers = [layer]
        super().validate()
        if len(self.layers) != 1:
            raise HParamsError(f"hparams: layers={self.layers} is not allowed; WISE edits one layer")
        if len(self.act_margin) != 3:
            raise HParamsError(f"hparams: act_margin={self.act_margin} must be three numbers [alpha, beta, gamma]")
        if self.merge_freq % self.save_freq:
            raise HParamsError(f"hparams: merge_freq={self.merge_freq} must be a multiple of save_freq={self.save_freq}")
        for key, why in (("replay", "the replay of past edits (the paper's Appendix B.3)"),
                         ("use_chat_template", "chat templates")):
            if getattr(self, key):
                raise HParamsError(f"hparams: {key}=true is not allowed; editfast's WISE does not implement {why}")
        if self.loc_corpus not in ("counterfact-train", "wikitext") and not Path(self.loc_corpus).expanduser().is_file():
            raise HParamsError(f"hparams: loc_corpus={self.loc_corpus!r} is not allowed; choose counterfact-train, "
                               "wikitext or a text file")
        if not self.module or self.module != self.module.strip() or self.module.startswith("."):
            raise HParamsError(f"hparams: module={self.module!r} must be 'rewrite' or a dotted module name "
                               "under the decoder layer (e.g. 'mlp.down_proj')")

    def check_modules(self, adapter) -> None:
        if self.inner_params:
            check_inner_params(self.inner_params, self.layers[0], adapter)


def weight_name(adapter, hp: WISEHyperParams) -> str:
    """The full name of the weight WISE keeps a side memory of."""
    layer = hp.layers[0]
    if hp.module == "rewrite":
        return adapter.rewrite_tmp.format(layer) + ".weight"
    return f"{adapter.layer_tmp.format(layer)}.{hp.module}.weight"


def activation_name(config) -> str:
    """The model's hidden activation (config.hidden_act / activation_function), which Δ applies."""
    name = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    if name not in ACTS:
        raise EditfastError(f"WISE: the model's activation {name!r} is not one of {', '.join(ACTS)}")
    return name


# -----------------------------------------------------------------------------------------------
# the equations (dtype-generic; tests check them in float64)


def _mean_pos(x: torch.Tensor) -> torch.Tensor:
    """The mean of the positive entries, 0 when none (the original's hinge reduction)."""
    pos = x > 0
    return (x * pos).sum() / pos.sum() if pos.any() else x.new_zeros(())


def margin_loss(d_in: torch.Tensor, d_out: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """L_a = mean₊(Δ_out − Δ_in + γ) + mean₊(Δ_out − α) + mean₊(β − Δ_in) (W3)."""
    return (_mean_pos(d_out.view(-1, 1) - d_in + gamma) + _mean_pos(d_out - alpha) + _mean_pos(beta - d_in))


def target_loss(logits: torch.Tensor, labels: torch.Tensor, row: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Per row Σ CE(target tokens) / (target tokens + 1), averaged over rows (W2). ``logits`` [N, V] at
    the N target predictions, ``labels`` [N] their tokens, ``row`` [N] their rows, ``n`` [R] targets per row."""
    ce = F.cross_entropy(logits, labels, reduction="none")
    return (torch.zeros(len(n), dtype=ce.dtype, device=ce.device).index_add(0, row, ce) / (n + 1)).mean()


def draw_mask(shape: Sequence[int], ratio: float, seed: int, shard: int) -> torch.Tensor:
    """A shard's gradient mask: each entry 1 with probability ``ratio`` (W6)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + shard)
    return torch.rand(tuple(shape), generator=g, dtype=torch.float64) < ratio


def magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of the largest |entries| (TIES's trim)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k < 1:
        raise EditfastError(f"WISE merge: densities={density} keeps no entry of a {delta.numel()}-entry weight")
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    keep[delta.abs().reshape(-1).float().topk(k).indices] = 1
    return delta * keep.view_as(delta)


def bernoulli(delta: torch.Tensor, density: float, rescale: bool, gen: torch.Generator) -> torch.Tensor:
    """DARE's drop: keep each entry with probability ``density`` (rescaled by 1/density)."""
    if density >= 1:
        return delta
    keep = (torch.rand(delta.shape, generator=gen, dtype=torch.float64) < density).to(delta.dtype)
    out = delta * keep
    return out / density if rescale else out


# merge_alg -> (sparsify, consensus, normalize), the original's GTA table
GTA = {"ties": ("magnitude", "sum", True), "magnitude_norm": ("magnitude", None, True),
       "magnitude": ("magnitude", None, False), "sign": (None, "sum", True),
       "dare_ties": ("rescaled_random", "sum", False), "dare_linear": ("random", None, False)}


def merge(alg: str, weights: Sequence[float], base: torch.Tensor, tensors: Sequence[torch.Tensor],
          density: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """The original's ``merge_dict[alg].execute(weights, base, tensors, densities)``."""
    if alg == "linear":  # the original's linear merge reads the first weight and tensor only
        return weights[0] * tensors[0] + (1.0 - weights[0]) * base
    sparsify, consensus, normalize = GTA[alg]
    deltas = []
    for t in tensors:
        d = t - base
        if sparsify == "magnitude":
            d = magnitude(d, density)
        elif sparsify is not None:
            d = bernoulli(d, density, sparsify == "rescaled_random", gen or torch.Generator().manual_seed(0))
        deltas.append(d)
    deltas = torch.stack(deltas)
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device).view(-1, *[1] * base.dim())
    wd = deltas * w
    if consensus:
        sign = wd.sign()
        majority = (wd.sum(0) >= 0).to(wd.dtype) * 2 - 1
        keep = (sign == majority).to(wd.dtype)
        mixed = (wd * keep).sum(0)
        divisor = (w * keep).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = wd.sum(0)
        divisor = w.sum(0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    return (base + mixed).to(base.dtype)


# -----------------------------------------------------------------------------------------------
# training one edit


@dataclass
class EditRows:
    """The edit's token rows (templates, then the loc row), right-padded."""

    batch: TokenBatch
    n_edit: int  # template rows; the last row is the loc text


def encode_edit(tok, request, templates: Sequence[str], loc_text: str, loc_tokens: int, device) -> EditRows:
    answer = tok(target_text(request.target_new), add_special_tokens=False)["input_ids"]
    if not answer:
        raise EditfastError(f"request {request.case_id}: its target tokenises to nothing")
    rows, labels = [], []
    for t in templates:
        prompt = tok(t.format(request.filled()))["input_ids"]
        rows.append(list(prompt) + list(answer[:-1]))
        labels.append([-100] * (len(prompt) - 1) + list(answer))
    loc = tok(loc_text)["input_ids"][:loc_tokens]
    rows.append(loc)
    labels.append([-100] * len(loc))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = right_pad(rows, pad, device)
    lab = torch.full_like(ids, -100)
    for i, lr in enumerate(labels):
        lab[i, : len(lr)] = torch.tensor(lr, dtype=torch.long)
    return EditRows(TokenBatch(ids, mask, lab), len(templates))


def train_side(lm, hp: WISEHyperParams, rows: EditRows, base: torch.Tensor, side: torch.Tensor,
               mask: torch.Tensor, backend: str = "fast") -> tuple[torch.Tensor, float, int]:
    """One edit's training of W' (W2–W5) from ``side``; returns (W', recorded activation, steps).

    The fast backend runs each iteration from the edited layer up (the layers below see nothing
    that changes: their output is recorded once) and the LM head at the target predictions only;
    the reference backend runs the whole model and the head everywhere, as the original."""
    model, adapter = lm.model, lm.adapter
    name = weight_name(adapter, hp)
    module = model.get_submodule(name.rsplit(".", 1)[0])
    act = ACTS[activation_name(model.config)]
    conv1d = type(module).__name__ == "Conv1D"
    alpha, beta, gamma = hp.act_margin
    b = rows.batch
    above = Above(lm, hp.layers[0])
    ref = backend == "reference"
    h = None if ref else above.hidden(b)
    lrow, lpos = (b.labels[: rows.n_edit] != -100).nonzero(as_tuple=True)  # the LM head runs there only
    labels = b.labels[lrow, lpos]
    n_lab = (b.labels[: rows.n_edit] != -100).sum(1)
    head, norm = output_logits(model), adapter.final_norm
    w = side.detach().clone().requires_grad_(True)
    m = mask.to(w.dtype)
    lo, hi = (base - hp.norm_constraint, base + hp.norm_constraint) if hp.norm_constraint is not None else (None, None)
    seen: dict[str, torch.Tensor] = {}

    def swap(y0: torch.Tensor) -> torch.Tensor:
        seen["y0"], seen["y"] = y0.detach(), linear_out(seen.pop("x"), w, module.bias, conv1d)
        return seen["y"]

    def keep_input(mod, args):
        seen["x"] = args[0]

    val, pre, recorded, steps = 1e9, 0.0, float("nan"), 0
    one = torch.tensor([0], device=b.input_ids.device)
    handle = module.register_forward_pre_hook(keep_input)
    try:
        for i in range(hp.n_iter):
            with Trace(model, outputs=[norm], edit={name.rsplit(".", 1)[0]: swap}, detach=False) as tr:
                full = above.logits(b, h, None if ref else one)
            logits = full[lrow, lpos] if ref else head(tr.outputs[norm][lrow, lpos])
            d = row_score(token_distance(seen["y0"], seen["y"], act), b.attention_mask)
            ft = target_loss(logits if logits.dtype == torch.float64 else logits.float(), labels, lrow, n_lab)
            loss = ft + margin_loss(d[: rows.n_edit], d[rows.n_edit:], alpha, beta, gamma).to(ft.dtype)
            stop = abs(val - pre) <= 1e-4 and val <= 0.02
            if stop or i == hp.n_iter - 1:
                recorded = float(d[: rows.n_edit].detach().mean())
            if stop:
                break
            (g,) = torch.autograd.grad(loss, w)
            with torch.no_grad():
                step = (g * m).add(w, alpha=WEIGHT_DECAY)
                w.add_(step, alpha=-hp.edit_lr)
                if lo is not None:
                    w.copy_(torch.clamp(w, min=lo, max=hi))
            pre, val = val, float(loss.detach())
            steps += 1
    finally:
        handle.remove()
    return w.detach(), recorded, steps


# -----------------------------------------------------------------------------------------------
# the method


def loc_texts(source: str) -> list[str]:
    """The unrelated texts the edits train against, in turn (W1): the first N_LOC requests of
    CounterFact's training split (prompt and true answer; disjoint from the evaluation records) or
    texts of a corpus."""
    if source == "counterfact-train":
        return [f"{r.filled()} {r.target_true}" for r in load_dataset(source, N_LOC)]
    return corpus_texts(source, N_LOC)


@dataclass
class WISEState(State):
    loc: list[str] = field(default_factory=list)  # read once per session, not journaled


def scalar(state: State, key: str, default: float) -> float:
    t = state.tensors.get(key)
    return default if t is None else float(t.item())


class WISE(Method):
    name = "wise"
    summary = "a routed side memory of one MLP weight, sharded and merged; base weights untouched (Wang et al., 2024)"
    hparams_class = WISEHyperParams
    easyedit_alg = "WISE"
    routes = True
    default_batch_size = 1
    max_batch_size = 1
    presets = {
        # EasyEdit's hparams/WISE files (n_iter, act_margin and act_ratio differ per family)
        "gpt2-xl": dict(layers=[8], module="mlp.c_fc", n_iter=40, act_margin=[5.0, 20.0, 10.0], act_ratio=0.8),
        "gpt-j-6b": dict(layers=[21], module="mlp.fc_out", n_iter=70, act_margin=[15.0, 40.0, 20.0], act_ratio=0.88),
        "llama-2-7b": dict(layers=[27], module="mlp.down_proj", n_iter=70, act_margin=[5.0, 20.0, 10.0],
                           act_ratio=0.88),
        # SmolLM2: the Llama files' margins, 30 steps (a CPU's budget), act_ratio from 5 held-out facts
        # (bench/RESULTS.md, "WISE: the SmolLM2 preset")
        "smollm2-135m": dict(layers=[25], module="mlp.down_proj", n_iter=30, act_margin=[5.0, 20.0, 10.0],
                             act_ratio=0.95),
        "tiny": dict(layers=[2], module="mlp.down_proj", n_iter=5, act_margin=[0.5, 2.0, 1.0], act_ratio=0.88,
                     save_freq=2, merge_freq=4, loc_tokens=8),
    }

    def prepare(self, lm, hp, progress: bool = True) -> State:
        name = weight_name(lm.adapter, hp)
        try:
            lm.model.get_parameter(name)
        except AttributeError:
            raise HParamsError(f"hparams: module={hp.module!r}: the model has no weight {name!r}") from None
        return WISEState(loc=loc_texts(hp.loc_corpus))

    def sites(self, lm, hp) -> list[str]:
        return [weight_name(lm.adapter, hp)]  # routed, never written

    def install(self, lm, hp, state: State) -> None:
        """Route the edited module through the state's memories (``routing.SideMemory``): W' and the
        shards' memories (WISE-Retrieve), or W' and the merged weight (WISE-Merge)."""
        name = weight_name(lm.adapter, hp)
        if not int(scalar(state, "count", 0)):  # no edit yet (prepared, or undone to 0): the model as loaded
            routing.uninstall(lm.model, name.rsplit(".", 1)[0])
            return
        module = lm.model.get_submodule(name.rsplit(".", 1)[0])
        base = module.weight.detach()
        t = state.tensors
        weights, mins = [t.get("side", base)], [scalar(state, "side_min", NO_ACT)]
        merged = not hp.retrieve and "merged" in t
        if merged:
            weights.append(t["merged"])
            mins.append(mins[0])
        elif hp.retrieve:
            n = int(scalar(state, "memories", 0))
            weights += [t[f"memory.{i}"] for i in range(n)]
            mins += [float(t[f"memory.{i}.min"]) for i in range(n)]
        bias = getattr(module, "bias", None)
        memory = SideMemory(torch.stack([w.to(base) for w in weights]), torch.tensor(mins, dtype=torch.float64),
                            None if bias is None else bias.detach().clone(), act=activation_name(lm.model.config),
                            act_ratio=hp.act_ratio, merged=merged, conv1d=type(module).__name__ == "Conv1D")
        routing.install(lm.model, name.rsplit(".", 1)[0], memory)

    def memory_size(self, state: State) -> dict[str, int] | None:
        """W', the memories in use and the merged weight: how many, and their bytes."""
        t = state.tensors
        ts = [t[k] for k in ["side", "merged", *(f"memory.{i}" for i in range(int(scalar(state, "memories", 0))))]
              if k in t]
        return {"entries": len(ts), "bytes": sum(x.numel() * x.element_size() for x in ts)}

    def templates(self, lm, hp, seed: int = 0, mode: str = "generated", progress: bool = False) -> list[list[str]]:
        """["{}"] and ten greedy continuations of the starters (W1); ``fixed``: the bare prompt alone."""
        if mode == "fixed":
            return [["{}"]]
        with routing.bypassed(lm.model):  # from the unedited model, as the original's first edit
            return [["{}", *greedy_prefixes(lm)]]

    def edit(self, lm, requests, hp, state: State, templates, *, targets=None, trace=None, backend="fast",
             progress=False):
        if len(requests) != 1:
            raise EditfastError(f"WISE edits one request at a time, got a batch of {len(requests)}")
        name = weight_name(lm.adapter, hp)
        base = lm.model.get_parameter(name).detach()
        count = int(scalar(state, "count", 0))
        side = state.tensors.get("side", base)
        if count % hp.save_freq == 0:
            state.set("mask", draw_mask(base.shape, hp.mask_ratio, hp.mask_seed, count // hp.save_freq))
        if not getattr(state, "loc", None):
            state.loc = loc_texts(hp.loc_corpus)
        loc = state.loc[count % len(state.loc)]
        rows = encode_edit(lm.tokenizer, requests[0], [t for g in templates for t in g], loc, hp.loc_tokens,
                           base.device)
        with routing.bypassed(lm.model):  # W' trains against the base module's output
            w, recorded, steps = train_side(lm, hp, rows, base, side, state.tensors["mask"].to(base.device), backend)
        if trace is not None:
            trace.setdefault("wise", []).append({"steps": steps, "activation": recorded})
        count += 1
        state.set("count", torch.tensor(count, dtype=torch.int64))
        state.set("side", w)
        state.set("side_min", torch.tensor(min(scalar(state, "side_min", NO_ACT), recorded), dtype=torch.float64))
        if count % hp.save_freq == 0:
            self._save_shard(state, hp, base)
        if count % hp.merge_freq == 0:
            self._merge(state, hp, base, count // hp.merge_freq)
        yield []

    @staticmethod
    def _save_shard(state: State, hp: WISEHyperParams, base: torch.Tensor) -> None:
        n = int(scalar(state, "memories", 0))
        state.set(f"memory.{n}", state.tensors["side"])
        state.set(f"memory.{n}.min", state.tensors["side_min"])
        state.set("memories", torch.tensor(n + 1, dtype=torch.int64))
        state.set("side", base.clone())
        if hp.retrieve:  # WISE-Merge keeps the smallest activation of all edits
            state.set("side_min", torch.tensor(NO_ACT, dtype=torch.float64))

    @staticmethod
    def _merge(state: State, hp: WISEHyperParams, base: torch.Tensor, k: int) -> None:
        gen = torch.Generator().manual_seed(hp.mask_seed * 1_000_003 + 500_000 + k)
        n = int(scalar(state, "memories", 0))
        mems = [state.tensors[f"memory.{i}"] for i in range(n)]
        if hp.retrieve:
            take = hp.merge_freq // hp.save_freq
            merged = merge(hp.merge_alg, [hp.weights / take] * take, base, mems[-take:], hp.densities, gen)
            low = min(float(state.tensors[f"memory.{i}.min"]) for i in range(n - take, n))
            state.set(f"memory.{n - take}", merged)
            state.set(f"memory.{n - take}.min", torch.tensor(low, dtype=torch.float64))
            state.set("memories", torch.tensor(n - take + 1, dtype=torch.int64))
            return
        if "merged" not in state.tensors:
            merged = merge(hp.merge_alg, [hp.weights / n] * n, base, mems, hp.densities, gen)
        else:
            merged = merge(hp.merge_alg, [0.4 / n] * n + [0.6], base, mems + [state.tensors["merged"]], hp.densities,
                           gen)
        state.set("merged", merged)
        state.set("memories", torch.tensor(0, dtype=torch.int64))


@torch.no_grad()
def greedy_prefixes(lm) -> list[str]:
    """The original's ten templates: each starter continued greedily by 5 and by 10 tokens, + " {}"
    (a greedy 5-token continuation is the first half of the 10-token one: one generation each)."""
    model, tok = lm.model, lm.tokenizer
    out: dict[int, list[str]] = {n: [] for n in TEMPLATE_LENGTHS}
    for word in STARTERS:
        ids = torch.tensor([tok(word)["input_ids"]], device=next(model.parameters()).device)
        full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max(TEMPLATE_LENGTHS),
                              min_new_tokens=max(TEMPLATE_LENGTHS), do_sample=False,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)[0]
        for n in TEMPLATE_LENGTHS:
            text = tok.decode(full[: ids.shape[1] + n], skip_special_tokens=True)
            out[n].append(text.replace("{", " ").replace("}", " ") + " {}")
    return [t for n in TEMPLATE_LENGTHS for t in out[n]]


METHOD = WISE()
