"""MEND's editor network, the gradient decomposition it reads, and its training loop.

MEND (Mitchell et al., 2022) edits a weight W [out, in] of a linear layer with a transformed
gradient. The gradient of a loss summed over tokens is a sum of rank-one terms,
∇W = Σ_t δ_t u_tᵀ, with u_t the layer's input at token t and δ_t = ∂L/∂y_t the gradient of the
loss at its output. ``capture`` reads every u_t and δ_t of the edited weights with one forward and
one backward pass (the backward stops at the lowest edited layer). A small network per weight
shape (``GradientTransform``) maps each pair (u_t, δ_t) to (ũ_t, δ̃_t); the edit is

    ΔW = edit_lr · Σ_t δ̃_t ũ_tᵀ        (rank ≤ number of tokens; kept as factors, ``update.LowRank``)

The network is trained (``train_mend``) so that the edited model puts the new target after a
paraphrase of the prompt (edit loss) while keeping its output distribution on unrelated prompts
(locality KL), as the original's ``EditTrainer``.

Reproduced from the original (github eric-mitchell/mend: algs/mend.py, nn.py, hooks.py,
trainer.py, losses.py; the same code in zjunlp/EasyEdit trainer/algs/MEND.py), with its quirks:

- Q1 normalisation: each ``GradientTransform`` keeps a running mean and variance of the u and δ
  it has seen *in training mode* (Welford; sample variance, ``std = sqrt(s / (k - 1))``), updated
  with the current edit's tokens before they are normalised: (x - mean) / (std + 1e-7). Tokens
  whose u or δ is all zero (padding, positions after the target) are dropped first. The original
  updates token by token in a Python loop; here one batch is merged at once (Chan et al.'s
  parallel form of the same recurrence, equal in exact arithmetic; tests/test_method_mend.py
  compares it with the token loop in float64).
- Q2 the network sees and returns *normalised* factors: with ``combine`` the input is
  [u_norm, δ_norm] and the output is split back, so even the identity-initialised network
  edits with Σ norm(δ) norm(u)ᵀ, not with the raw gradient.
- Q3 ``IDMLP``: ``n_hidden + 1`` low-rank residual layers x + relu(scale_m ⊙ (x vᵀ uᵀ + b) +
  shift_m); u starts at zero (identity), v ~ N(0, 1), rank min(rank, dim). The original passes a
  ``relu`` flag that its layer ignores: every layer, the last included, has the relu.
- Q4 ``shared``: one network per weight shape (in, out); each weight has its own scale/shift
  ("mode", the index of the weight among those of its shape, in order).
- Q5 the edit *adds* the transformed gradient: W + edit_lr · ΔW with ``edit_lr`` learned per
  weight and initialised positive (1e-4), so an untrained network moves up the edit loss; the
  learned rates turn negative within a few optimiser steps (``lr_lr``).
- Q6 training: the loss is cedit · NLL(target | paraphrase, edited model) + cloc · KL(pre || post)
  on a locality prompt; Adam over the network *and* the edit rates (lr), plus a second Adam over
  the edit rates alone (lr_lr), so the rates are stepped by both; gradients are accumulated
  (divided by accumulate_bs) and the optimisers step when ``iteration > 0 and iteration %
  accumulate_bs == 0`` (the first step therefore sums accumulate_bs + 1 edits), after clipping the
  gradient norm at grad_clip; a step whose gradient has NaN/Inf is not accumulated.
- Q7 validation: every ``val_interval`` iterations (counted from 0, after that iteration's step) on
  ``val_steps`` requests kept out of training, with the loss cedit·NLL + cloc·KL; the network of
  the best validation loss is the one kept (the original's early-stopping key
  "loss/total_edit_val"; its patience of 20,000 iterations is not reproduced).

Deviations (for a CPU tool): the last iteration is validated too (the original drops the
iterations after its last validation); held-out requests, never trained or validated on, are
then each edited alone to measure edit success (``heldout_success``). The edited forward of
training runs only the layers from the lowest edited one up (``Above``; the layers below are the
same before and after the edit, and run once per step for all its rows) and adds x·Ũᵀ·D̃ to each
edited layer's output instead of building W + ΔW (the same function, cheaper); the LM head runs
only at the scored positions. The locality KL is taken, as the original does for decoder-only
models, at every token of the locality prompt (its attention mask); ``loc_kl_positions="answer"``
takes it at the positions predicting the locality answer only, as EasyEdit's CounterFact loader
(whose slicing is one position off, not reproduced). Training data (EasyEdit's CounterFact
records): the edit on the prompt, its loss on the paraphrase (the original's "rephrase"), the
locality on the neighbourhood prompt with its true answer. The network, its running statistics
and the learned rates are saved as safetensors with a JSON side file; nothing is pickled.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from editfast.core.errors import EditfastError
from editfast.data.requests import Request
from editfast.models.trace import LayerRest, SkipBelow, Trace
from editfast.models.update import LowRank, weight_param

NET_FILE = "mend.safetensors"
META_FILE = "mend.json"
FORMAT = "editfast-mend-1"
# The network's architecture fields (the rest of the hyper-parameters only concern training).
ARCH_KEYS = ("n_hidden", "rank", "init", "norm", "combine", "x_only", "delta_only", "one_sided", "shared",
             "mlp_class", "act")


class MENDFileError(EditfastError):
    """A missing, corrupt or mismatched MEND network directory."""


# ----------------------------------------------------------------------------------------------- network


class LRLinear(nn.Module):
    """x + relu(scale_m ⊙ (x vᵀ uᵀ + b) + shift_m) (init "id"), or the relu alone ("xavier")."""

    def __init__(self, dim: int, rank: int, init: str, n_modes: int | None):
        super().__init__()
        mid = min(rank, dim)
        if init == "id":
            self.u = nn.Parameter(torch.zeros(dim, mid))
            self.v = nn.Parameter(torch.randn(mid, dim))
        else:  # "xavier"
            self.u = nn.Parameter(torch.empty(dim, mid))
            self.v = nn.Parameter(torch.empty(mid, dim))
            nn.init.xavier_uniform_(self.u, gain=nn.init.calculate_gain("relu"))
            nn.init.xavier_uniform_(self.v, gain=1.0)
        self.bias = nn.Parameter(torch.zeros(dim))
        if n_modes is not None:
            self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
            self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.n_modes, self.init = n_modes, init

    def forward(self, x: torch.Tensor, mode: int | None = None) -> torch.Tensor:
        pre = (x @ self.v.T) @ self.u.T + self.bias
        if mode is not None:
            pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        acts = pre.clamp(min=0)  # the original's clamp: a gradient at 0 (Q3: every layer has it)
        return acts + x if self.init == "id" else acts


class IDMLP(nn.Module):
    def __init__(self, dim: int, n_hidden: int, rank: int, init: str, n_modes: int | None):
        super().__init__()
        self.layers = nn.ModuleList([LRLinear(dim, rank, init, n_modes) for _ in range(n_hidden + 1)])

    def forward(self, x: torch.Tensor, mode: int | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mode)
        return x


class GradientTransform(nn.Module):
    """(u [T, x_dim], δ [T, delta_dim]) -> (ũ, δ̃) for the rows with non-zero u and δ (Q1, Q2)."""

    def __init__(self, x_dim: int, delta_dim: int, cfg: dict, n_modes: int | None = None):
        super().__init__()
        self.x_dim, self.delta_dim, self.cfg = x_dim, delta_dim, dict(cfg)
        if cfg["combine"] and (cfg["one_sided"] or cfg["x_only"] or cfg["delta_only"]):
            raise EditfastError("MEND: combine cannot be used with the one-sided variants (one_sided, x_only, "
                                "delta_only)")
        for name, dim in (("u", x_dim), ("v", delta_dim)):
            for stat in ("mean", "std", "s"):
                self.register_buffer(f"{name}_{stat}", torch.full((dim,), float("nan")))
        self.register_buffer("k", torch.full((1,), float("nan")))

        def net(dim):
            return IDMLP(dim, cfg["n_hidden"], cfg["rank"], cfg["init"], n_modes)

        self.mlp = self.mlp1 = self.mlp2 = None
        if cfg["combine"]:
            self.mlp = net(x_dim + delta_dim)
        elif cfg["one_sided"]:
            if x_dim > delta_dim:
                self.mlp2 = net(delta_dim)
            else:
                self.mlp1 = net(x_dim)
        elif cfg["x_only"]:
            self.mlp1 = net(x_dim)
        elif cfg["delta_only"]:
            self.mlp2 = net(delta_dim)
        else:
            self.mlp1, self.mlp2 = net(x_dim), net(delta_dim)

    @torch.no_grad()
    def update_stats(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """Merge the rows of u and v into the running mean / sum of squared deviations / count."""
        n = u.shape[0]
        if n == 0:
            return
        k = float(self.k.item())
        for x, mean, s in ((u, self.u_mean, self.u_s), (v, self.v_mean, self.v_s)):
            x = x.double()
            mb = x.mean(0)
            sb = ((x - mb) ** 2).sum(0)
            if math.isnan(k):
                new_mean, new_s = mb, sb
            else:
                d = mb - mean.double()
                total = k + n
                new_mean = mean.double() + d * (n / total)
                new_s = s.double() + sb + d * d * (k * n / total)
            mean.copy_(new_mean)
            s.copy_(new_s)
        self.k.fill_(n if math.isnan(k) else k + n)
        if self.k.item() < 2:
            raise EditfastError(f"MEND: cannot normalise with only {int(self.k.item())} token(s) seen so far")
        self.u_std.copy_((self.u_s / (self.k - 1)) ** 0.5)
        self.v_std.copy_((self.v_s / (self.k - 1)) ** 0.5)

    @property
    def ready(self) -> bool:
        """Whether the running statistics have been set (by training)."""
        return bool(torch.isfinite(self.k).all() and torch.isfinite(self.u_std).all()
                    and torch.isfinite(self.v_std).all())

    def forward(self, u: torch.Tensor, v: torch.Tensor, mode: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.u_mean.dtype
        u = u.to(dtype).reshape(-1, u.shape[-1])
        v = v.to(dtype).reshape(-1, v.shape[-1])
        keep = (u != 0).any(-1) & (v != 0).any(-1)
        u, v = u[keep], v[keep]
        if self.training:
            self.update_stats(u, v)
        if self.cfg["norm"]:
            u = (u - self.u_mean) / (self.u_std + 1e-7)
            v = (v - self.v_mean) / (self.v_std + 1e-7)
        if self.mlp is not None:
            out = self.mlp(torch.cat((u, v), -1), mode)
            return out[:, : self.x_dim], out[:, self.x_dim:]
        return (u if self.mlp1 is None else self.mlp1(u, mode)), (v if self.mlp2 is None else self.mlp2(v, mode))


@dataclass(frozen=True)
class Site:
    """One edited weight: its parameter name, module name and logical (in, out) sizes."""

    weight: str
    module: str
    x_dim: int  # in
    delta_dim: int  # out


def mlp_sites(lm, layers: Sequence[int]) -> list[Site]:
    """Every weight matrix of the MLP blocks of ``layers`` (the original edits all of them: GPT-2's
    c_fc and c_proj, GPT-J's fc_in and fc_out, Llama's gate, up and down projections), found
    through the adapter's MLP template, in layer then registration order."""
    out = []
    for l in layers:
        base = lm.adapter.mlp_tmp.format(l)
        try:
            mlp = lm.model.get_submodule(base)
        except AttributeError:
            raise EditfastError(f"MEND: the model has no MLP block {base!r} (layer {l})") from None
        for name, mod in mlp.named_modules():
            w = getattr(mod, "weight", None)
            if name and not list(mod.children()) and isinstance(w, torch.Tensor) and w.dim() == 2:
                full = f"{base}.{name}"
                _, transposed = weight_param(lm.model, f"{full}.weight")
                d_out, d_in = (w.shape[1], w.shape[0]) if transposed else tuple(w.shape)
                out.append(Site(f"{full}.weight", full, d_in, d_out))
    if not out:
        raise EditfastError(f"MEND: no weight matrices in the MLP blocks of layers {list(layers)}")
    return out


class MENDNet(nn.Module):
    """The editor: one GradientTransform per weight (or per weight shape, ``shared``) and one
    learned edit rate per weight."""

    def __init__(self, sites: Sequence[Site], cfg: dict, edit_lr: float):
        super().__init__()
        self.sites, self.cfg = list(sites), {k: cfg[k] for k in ARCH_KEYS}
        if self.cfg["mlp_class"] != "IDMLP" or self.cfg["act"] != "relu":
            raise EditfastError("MEND: only mlp_class IDMLP with act relu is implemented")
        self.key, self.mode = {}, {}
        if cfg["shared"]:
            groups: dict[tuple[int, int], list[Site]] = {}
            for s in self.sites:
                groups.setdefault((s.x_dim, s.delta_dim), []).append(s)
            self.transforms = nn.ModuleDict({f"{x}x{d}": GradientTransform(x, d, cfg, len(g))
                                             for (x, d), g in groups.items()})
            for (x, d), g in groups.items():
                for i, s in enumerate(g):
                    self.key[s.weight], self.mode[s.weight] = f"{x}x{d}", i
        else:
            self.transforms = nn.ModuleDict({s.weight.replace(".", "#"): GradientTransform(s.x_dim, s.delta_dim, cfg)
                                             for s in self.sites})
            for s in self.sites:
                self.key[s.weight], self.mode[s.weight] = s.weight.replace(".", "#"), None
        self.edit_lrs = nn.Parameter(torch.full((len(self.sites),), float(edit_lr)))

    def transform(self, site: Site, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transforms[self.key[site.weight]](u, delta, self.mode[site.weight])

    def factors(self, grads: dict[str, tuple[torch.Tensor, torch.Tensor]]
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per weight (U [out, T], V [in, T]) with ΔW = U Vᵀ = edit_lr · Σ_t δ̃_t ũ_tᵀ (Q5: added to W)."""
        out = {}
        for i, s in enumerate(self.sites):
            u_t, d_t = self.transform(s, *grads[s.weight])
            out[s.weight] = ((self.edit_lrs[i] * d_t).T, u_t.T)
        return out

    def ready(self) -> bool:
        return all(t.ready for t in self.transforms.values())


# ----------------------------------------------------------------------------------------------- batches


@dataclass
class TokenBatch:
    """Right-padded sequences with the positions whose next token is scored."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]: the token predicted at position i (i.e. input_ids[:, i + 1]), else -100


def encode(tok, pairs: Sequence[tuple[str, str]], device) -> TokenBatch:
    """(context, continuation) pairs, each tokenised on its own without special tokens (as the edit
    metrics score them) and concatenated; the continuation carries its leading space."""
    ctx = tok([c for c, _ in pairs], add_special_tokens=False)["input_ids"]
    cont = tok([t for _, t in pairs], add_special_tokens=False)["input_ids"]
    seqs = [c + t for c, t in zip(ctx, cont)]
    L = max(map(len, seqs))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    labels = torch.full((len(seqs), L), -100, dtype=torch.long)
    for i, (c, t) in enumerate(zip(ctx, cont)):
        if not c or not t:
            raise EditfastError(f"MEND: cannot edit {pairs[i][1]!r} after {pairs[i][0]!r}: empty prompt or target")
        n = len(c) + len(t)
        ids[i, :n] = torch.tensor(c + t)
        mask[i, :n] = 1
        labels[i, len(c) - 1: n - 1] = torch.tensor(t)
    return TokenBatch(ids.to(device), mask.to(device), labels.to(device))


def edit_pairs(requests: Sequence[Request]) -> list[tuple[str, str]]:
    return [(r.filled(), " " + r.target_new) for r in requests]


def logits_of(lm, batch: TokenBatch, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, L, V], or only at the columns ``keep`` [B, len(keep), V] (the LM head is the
    largest matrix of a small model: it runs on the scored positions alone)."""
    kw = {} if keep is None else {"logits_to_keep": keep}
    return lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **kw).logits


def scored_columns(batch: TokenBatch) -> torch.Tensor:
    """The columns where some row has a label."""
    return (batch.labels != -100).any(0).nonzero().squeeze(1)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (the original computes its losses in float32; float64 stays)."""
    return x if x.dtype == torch.float64 else x.float()


def target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over every labelled position of the batch (the original's masked_log_probs "nll")."""
    mask = labels != -100
    logp = _fp32(logits).log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(logp * mask).sum() / mask.sum()


def kl_loc(pre: torch.Tensor, post: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_masked KL(pre || post) / Σ mask (the original's kl_loc_loss)."""
    pre, post = _fp32(pre), _fp32(post)
    kl = (pre.softmax(-1) * (pre.log_softmax(-1) - post.log_softmax(-1))).sum(-1)
    m = mask.float()
    return (kl * m).sum() / m.sum()


# ----------------------------------------------------------------------------------------------- hooks


def capture(lm, sites: Sequence[Site], batch: TokenBatch, run=None, keep: torch.Tensor | None = None
            ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """u (the module's input) and δ = ∂L/∂y (the gradient of the edit loss at its output) at every
    token, for each site, with L the mean NLL of ``batch``'s labels: {weight: (u [B, L, in],
    δ [B, L, out])}, the loss and the (unedited) logits at the columns ``keep`` (default: those
    with a label). ``run(batch, keep)`` gives the logits (default: the whole model). The model's
    parameters need no gradient; the backward pass starts at the lowest edited layer. Rows without
    labels get δ = 0 (the network then skips their tokens)."""
    model = lm.model
    xs, ys, handles = {}, {}, []

    def hook(name):
        def fn(mod, inputs, output):
            xs[name] = inputs[0].detach()
            if not output.requires_grad:
                output.requires_grad_(True)
            ys[name] = output
        return fn

    try:
        for s in sites:
            handles.append(model.get_submodule(s.module).register_forward_hook(hook(s.weight)))
        with torch.enable_grad():
            keep = scored_columns(batch) if keep is None else keep
            logits = (run or (lambda b, k: logits_of(lm, b, k)))(batch, keep)
            loss = target_nll(logits, batch.labels[:, keep])
            grads = torch.autograd.grad(loss, [ys[s.weight] for s in sites])
    finally:
        for h in handles:
            h.remove()
    return {s.weight: (xs[s.weight], g.detach()) for s, g in zip(sites, grads)}, loss.detach(), logits.detach()


class Above:
    """Forward passes that start at layer ``first`` (the lowest edited one) from hidden states
    recorded there: layers below are the same before and after an edit, so training runs them once
    per step, for all its sequences together (``trace.SkipBelow``, as ``locate.LayerwiseReader``)."""

    def __init__(self, lm, first: int):
        self.lm, self.first, self.rest = lm, first, None

    @torch.no_grad()
    def hidden(self, batch: TokenBatch) -> torch.Tensor | None:
        if self.first == 0:
            return None
        model, adapter = self.lm.model, self.lm.adapter
        here = adapter.layer_tmp.format(self.first)
        learn = self.rest is None
        with (LayerRest(model.get_submodule(adapter.layer_tmp.format(self.first - 1))) if learn else nullcontext()) \
                as rest, Trace(model, inputs=[here], stop=True) as tr:
            logits_of(self.lm, batch)
        if learn:
            self.rest = rest
        return tr.inputs[here]

    def logits(self, batch: TokenBatch, h: torch.Tensor | None, keep: torch.Tensor | None = None) -> torch.Tensor:
        if h is None:
            return logits_of(self.lm, batch, keep)
        with SkipBelow(self.lm.model, self.lm.adapter, self.first - 1, self.rest.rest) as skip:
            skip.h = h
            return logits_of(self.lm, batch, keep)


def rows(batch: TokenBatch, sel: slice, labels: bool = True) -> TokenBatch:
    """Some rows of a batch (with their labels, or with none)."""
    lab = batch.labels[sel] if labels else torch.full_like(batch.labels[sel], -100)
    return TokenBatch(batch.input_ids[sel], batch.attention_mask[sel], lab)


@contextmanager
def added_lowrank(lm, sites: Sequence[Site], factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Run the model as if each site's W had W + U Vᵀ: its output gets x V Uᵀ (differentiable in U, V)."""
    handles = []

    def hook(U, V):
        def fn(mod, inputs, output):
            x = inputs[0]
            return output + ((x.to(V.dtype) @ V) @ U.T).to(output.dtype)
        return fn

    try:
        for s in sites:
            U, V = factors[s.weight]
            handles.append(lm.model.get_submodule(s.module).register_forward_hook(hook(U, V)))
        yield
    finally:
        for h in handles:
            h.remove()


def edit_updates(lm, net: MENDNet, requests: Sequence[Request]) -> list[LowRank]:
    """The MEND updates of one batch of requests (one loss over all of them), not yet applied."""
    batch = encode(lm.tokenizer, edit_pairs(requests), lm.device)
    grads, _, _ = capture(lm, net.sites, batch)
    with torch.no_grad():
        fac = net.factors(grads)
    return [LowRank(s.weight, fac[s.weight][0].detach().contiguous(), fac[s.weight][1].detach().contiguous())
            for s in net.sites]


# ----------------------------------------------------------------------------------------------- training


# ----------------------------------------------------------------------------------------------- files


def save_net(net: MENDNet, out_dir: Path, meta: dict[str, Any]) -> None:
    """``mend.safetensors`` (network, running statistics, edit rates) and ``mend.json`` into
    ``out_dir`` (a directory the caller publishes atomically, ``outputs.OutputDir``)."""

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out_dir / NET_FILE), metadata={"format": FORMAT})
    doc = {"format": FORMAT, **meta, "arch": net.cfg,
           "sites": [{"weight": s.weight, "in": s.x_dim, "out": s.delta_dim} for s in net.sites]}
    (out_dir / META_FILE).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    for f in (NET_FILE, META_FILE):
        (out_dir / f).chmod(0o644)


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The ``mend.json`` of a trained network directory, checked for the fields MEND needs."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise MENDFileError(f"MEND network directory {str(d)!r} not found; train one with "
                            "'editfast train-mend --model M --data counterfact-train --out DIR'")
    f, w = d / META_FILE, d / NET_FILE
    if not f.is_file() or not w.is_file():
        missing = " and ".join(x.name for x in (f, w) if not x.is_file())
        raise MENDFileError(f"{str(d)!r} holds no trained MEND network (no {missing}); train one with "
                            "'editfast train-mend --model M --data counterfact-train --out DIR'")
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise MENDFileError(f"unreadable {str(f)!r}: {' '.join(str(e).split())}") from None
    ok = (isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("arch"), dict)
          and isinstance(doc.get("sites"), list) and isinstance(doc.get("layers"), list)
          and all(isinstance(l, int) and not isinstance(l, bool) for l in doc["layers"]) and doc["layers"]
          and isinstance(doc.get("model_fingerprint"), str) and all(k in doc["arch"] for k in ARCH_KEYS))
    if not ok:
        raise MENDFileError(f"{str(f)!r} is not the description of an editfast MEND network ({FORMAT})")
    return doc


def load_net(lm, directory: str | Path) -> tuple[MENDNet, dict[str, Any]]:
    """Load a trained network for ``lm``; MENDFileError when it is missing, corrupt, or was trained
    for another model (fingerprint, weight names or shapes)."""

    d = Path(directory).expanduser()
    doc = read_meta(d)
    if doc["model_fingerprint"] != lm.fingerprint:
        raise MENDFileError(f"the MEND network in {str(d)!r} was trained for another model "
                            f"({doc.get('model', '?')}, fingerprint {doc['model_fingerprint'][:12]}...), not "
                            f"{lm.spec} ({lm.fingerprint[:12]}...)")
    sites = mlp_sites(lm, doc["layers"])
    want = [{"weight": s.weight, "in": s.x_dim, "out": s.delta_dim} for s in sites]
    if doc["sites"] != want:
        raise MENDFileError(f"the MEND network in {str(d)!r} edits other weights or shapes than {lm.spec} has")
    try:
        state = load_file(str(d / NET_FILE))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MENDFileError(f"corrupt MEND network file {str(d / NET_FILE)!r}: {' '.join(str(e).split())}") from None
    try:
        net = MENDNet(sites, doc["arch"], 0.0)
    except (TypeError, ValueError, KeyError) as e:
        raise MENDFileError(f"bad architecture in {str(d / META_FILE)!r}: {e}") from None
    own = net.state_dict()
    bad = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise MENDFileError(f"the MEND network file {str(d / NET_FILE)!r} does not match its description "
                            f"({', '.join(bad[:3])})")
    if not all(torch.isfinite(state[k]).all() for k in state if not k.endswith((".k", "_mean", "_std", "_s"))):
        raise MENDFileError(f"the MEND network file {str(d / NET_FILE)!r} has non-finite weights")
    net.load_state_dict(state)
    net.to(lm.device).eval()
    if not net.ready():
        raise MENDFileError(f"the MEND network in {str(d)!r} was never trained (no normalisation statistics)")
    return net, doc
