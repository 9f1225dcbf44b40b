"""UltraEdit (Gu et al., 2025): training-, subject- and memory-free lifelong editing.

No subject lookup and no target optimisation. For a batch ("turn") of requests, one forward and
backward pass of the model, as it is before the turn, on each prompt followed by its answer gives,
at every position that predicts an answer token (``token="ans"``):

    k   the input of each edited module (a linear layer: MLP down/fc_out, gate or up projection)
    g   the gradient of the answer's cross-entropy with respect to that module's output

A lifelong running normaliser (running mean μ and standard deviation σ of the concatenation
[k, g], carried across all turns of a session) standardises them: k̂, ĝ = ([k, g] − μ) / (σ + ε).
Each position's pseudo-target is a gradient step scaled by its normalised key's squared norm,
v = −lr · ‖k̂‖² · ĝ, and the module's weight moves by the ridge solution over the turn's raw keys

    ΔW = Vᵀ K (KᵀK + λI)⁻¹ = Vᵀ (KKᵀ + λI)⁻¹ K        (rows of K, V: the turn's positions)

kept here as factors (``LowRank``: U = ((KKᵀ + λI)⁻¹ V)ᵀ, V = Kᵀ), solved in float64 in the dual
(N × N, N positions) form, or the primal form (d_in × d_in, then ``Dense``) when it is smaller.
Every edited module is solved from the same pass and they are applied together.

What the original code (github.com/XiaojieGu/UltraEdit, ``editor/ultraedit.py``, ``nets.py``,
``util.py``, ``data/base.py``) does, reproduced here, quirks included:

- Q1 requests of a turn are sorted by token length, longest first (stable), and cut into
  sub-batches of ``forward_batch_size`` (its ``dataset.batch_size``, 10); each sub-batch's loss is
  the *mean* cross-entropy over its answer tokens, so a position's gradient carries
  1 / (answer tokens in its sub-batch). (We run the whole turn in one pass with those weights:
  the same gradients.)
- Q2 the prompt is tokenised with the tokenizer's special tokens (a BOS for Llama), the answer
  (" " + target) on its own without them; the model reads prompt + answer[:-1]. Keys sit at the
  last prompt token and the answer's tokens but the last (``token="all"``: every position).
- Q3 one normaliser per weight *shape* ([d_in, d_out]), shared by every edited module of that
  shape (GPT-J's nine fc_out, Llama's gate and up projections), updated once per sub-batch per
  module in module order, with the current turn included before it normalises anything.
- Q4 its update: n' = n + b, δ = mean(x) − μ, μ += b δ / n', and the "variance" accumulator
  M += b · var(x) + n b δ² / n' with var the *unbiased* batch variance (Chan's rule has
  (b − 1) · var), σ = sqrt(M / (n' − 1 + ε)); normalisation (x − μ) / (σ + ε); ε = float32 eps.
  Deviation: a sub-batch of a single position (b = 1; the original's var is NaN then and the
  edit fails) adds 0 for its variance term.
- Q5 the ridge uses the raw keys (only ‖k̂‖² uses the normalised ones) with λ = 1 (``ridge_lambda``),
  solved by the original in float32 as the d_in × d_in system; the same ΔW within float tolerance.
- Q6 nothing but the normaliser survives a turn: the per-turn key cache on disk is overwritten by
  the next turn ("memory-free"); the normaliser (n, μ, M per shape) is the session state here,
  ``State.tensors`` ``norm.{d_in}x{d_out}.{n,mean,var}`` (journaled; missing = zeros).
- Its ``editor.batch_size`` (128) only pads the normalisation into fixed-size row blocks; the
  padded rows are dropped, so it changes nothing and is not a hyper-parameter here.

Presets. The original's values: ``lr`` 1e-6 (config/editor/ultraedit.yaml), sub-batches of 10,
turns of 100 edits (run.sh, the default batch size here), λ = 1 (hard-coded), and per model the
edited modules of config/model/*.yaml for zsRE/UltraEditBench:

- "gpt-j-6b": GPT-J 6B's fc_out (the MLP output projection) of layers 18-26 (config/model/gpt-j.yaml);
- "llama-2-7b": the original ships no Llama-2 configuration; this is its Llama-3-8B-Instruct
  one (same depth, width and module names): gate_proj of layers 11-15, up_proj of layers 18-24;
- "tiny": the random tiny models, down projections of layers 1 and 2;
- "smollm2-135m": down_proj of layers 19-27 (the original's GPT-J layout scaled to 30 layers),
  lr 1e-3, tuned here (``python bench/ultraedit_rows.py --tune``) on held-out CounterFact
  requests; the requests, the rule, the grid and what it measured are in bench/RESULTS.md
  ("UltraEdit: the SmolLM2 preset").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from editfast.core.errors import EditfastError, HParamsError
from editfast.engine.kv import right_pad
from editfast.methods.base import Method, State, matrix_module
from editfast.methods.hparams import HParams
from editfast.methods.locate_then_edit.targets import target_text
from editfast.models.archs import output_logits
from editfast.models.update import (
    Dense,
    LowRank,
    Update,
    weight_param,
)

EPS32 = torch.finfo(torch.float32).eps


@dataclass
class UltraEditHyperParams(HParams):
    # The module edited at each of ``layers`` (one entry per layer, or one for all): "rewrite" (the
    # model's MLP output projection) or a dotted name under the decoder layer, e.g. "mlp.up_proj".
    modules: list[str] = field(default_factory=lambda: ["rewrite"])
    lr: float = 1e-6  # the pseudo-target's step: v = −lr · ‖k̂‖² · ĝ
    ridge_lambda: float = 1.0  # λ of ΔW = Vᵀ K (KᵀK + λI)⁻¹ (the original's identity: 1)
    forward_batch_size: int = 10  # requests per loss mean and per normaliser update (Q1)
    token: str = "ans"  # positions read: "ans" (those predicting the answer) or "all"

    RANGES: ClassVar[dict] = {"lr": "> 0", "ridge_lambda": "> 0", "forward_batch_size": ">= 1",
                              "token": ("ans", "all")}

    def validate(self) -> None:
        super().validate()
        if len(self.modules) not in (1, len(self.layers)):
            raise HParamsError(f"hparams: modules={self.modules} must name one module for all layers or one per "
                               f"layer ({len(self.layers)} layers)")
        bad = [m for m in self.modules if not m or m != m.strip() or m.startswith(".") or m.endswith(".")]
        if bad:
            raise HParamsError(f"hparams: modules={self.modules} is not allowed; each must be 'rewrite' or a "
                               "dotted module name under the decoder layer (e.g. 'mlp.up_proj')")


# -----------------------------------------------------------------------------------------------
# the equations (dtype-generic; tests check them in float64)


def running_update(n: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor):
    """The original ``RunningMeanStd.update`` (Q4) with rows ``x`` [b, d]: returns (n', μ', M')."""
    b = x.shape[0]
    n2 = n + b
    delta = x.mean(0) - mean
    batch_var = x.var(0) if b > 1 else torch.zeros_like(mean)
    return n2, mean + b * delta / n2, var + b * batch_var + n * b * delta.pow(2) / n2


def running_std(n: torch.Tensor, var: torch.Tensor, eps: float = EPS32) -> torch.Tensor:
    return (var / (n - 1 + eps)).sqrt()


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = EPS32) -> torch.Tensor:
    return (x - mean) / (std + eps)


def pseudo_targets(keys: torch.Tensor, grads: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, lr: float,
                   eps: float = EPS32) -> torch.Tensor:
    """v = −lr · ‖k̂‖² · ĝ per row, [k̂, ĝ] the rows [k, g] normalised by (μ, σ)."""
    z = normalise(torch.cat([keys, grads], 1), mean, std, eps)
    k_hat, g_hat = z.split([keys.shape[1], grads.shape[1]], 1)
    return -lr * k_hat.pow(2).sum(1, keepdim=True) * g_hat


def ridge_update(weight: str, keys: torch.Tensor, values: torch.Tensor, lam: float) -> Update:
    """ΔW = Vᵀ K (KᵀK + λI)⁻¹ ([out, in]) from rows K [N, d_in], V [N, d_out], solved in float64:
    the dual N × N system as factors when N < d_in, else the primal d_in × d_in one, dense."""
    K, V = keys.double(), values.double()
    N, d_in = K.shape
    if N < d_in:
        A = K @ K.T
        A.diagonal().add_(lam)
        X = torch.linalg.solve(A, V)  # [N, d_out]
        return LowRank(weight, X.T.float().contiguous(), K.T.float().contiguous())
    A = K.T @ K
    A.diagonal().add_(lam)
    P = torch.linalg.solve(A, K.T @ V)  # [d_in, d_out]: the original's param_shift
    return Dense(weight, P.T.float().contiguous())


# -----------------------------------------------------------------------------------------------
# the method


@dataclass
class _Turn:
    """Token rows of a turn, in the original's order (longest first), and the positions read."""

    ids: list[list[int]]
    label_pos: list[list[int]]  # positions whose next token is an answer token
    labels: list[list[int]]
    read_pos: list[list[int]]  # positions whose keys and gradients are read
    order: list[int]  # request index of each row
    chunks: list[range]  # rows of each sub-batch


def encode_turn(tok, requests: Sequence, hp: UltraEditHyperParams) -> _Turn:
    rows, lpos, labels, rpos = [], [], [], []
    for r in requests:
        prompt = tok(r.filled())["input_ids"]
        answer = tok(target_text(r.target_new), add_special_tokens=False)["input_ids"]
        if not prompt or not answer:
            raise EditfastError(f"request {r.case_id}: its prompt or target tokenises to nothing")
        ids = list(prompt) + list(answer[:-1])
        pos = list(range(len(prompt) - 1, len(ids)))
        rows.append(ids)
        lpos.append(pos)
        labels.append(list(answer))
        rpos.append(pos if hp.token == "ans" else list(range(len(ids))))
    order = sorted(range(len(requests)), key=lambda i: len(rows[i]), reverse=True)  # stable, as collate_fn
    fb = hp.forward_batch_size
    return _Turn([rows[i] for i in order], [lpos[i] for i in order], [labels[i] for i in order],
                 [rpos[i] for i in order], order, [range(s, min(s + fb, len(order))) for s in range(0, len(order), fb)])


class UltraEdit(Method):
    name = "ultraedit"
    summary = "lifelong editing by normalised gradient pseudo-targets and a ridge solve, no z (Gu et al., 2025)"
    hparams_class = UltraEditHyperParams
    presets = {
        "gpt-j-6b": dict(layers=list(range(18, 27)), modules=["rewrite"], lr=1e-6, ridge_lambda=1.0,
                         forward_batch_size=10),
        # the original's Llama-3-8B-Instruct configuration (it ships none for Llama-2)
        "llama-2-7b": dict(layers=[11, 12, 13, 14, 15, 18, 19, 20, 21, 22, 23, 24],
                           modules=["mlp.gate_proj"] * 5 + ["mlp.up_proj"] * 7, lr=1e-6, ridge_lambda=1.0,
                           forward_batch_size=10),
        "smollm2-135m": dict(layers=list(range(19, 28)), modules=["rewrite"], lr=1e-3, ridge_lambda=1.0,
                             forward_batch_size=10),
        "tiny": dict(layers=[1, 2], modules=["rewrite"], lr=1e-3, ridge_lambda=1.0, forward_batch_size=10),
    }
    default_batch_size = 100  # the original's turns (dataset.n_edits)

    def module_names(self, lm, hp) -> list[str]:
        """The edited modules, in ``layers`` order; each must exist and hold a weight matrix."""
        mods = hp.modules * len(hp.layers) if len(hp.modules) == 1 else hp.modules
        names = [matrix_module(lm, layer, m, "modules") for layer, m in zip(hp.layers, mods)]
        if len(set(names)) != len(names):
            raise HParamsError(f"hparams: modules name a module twice: {names}")
        return names

    def sites(self, lm, hp) -> list[str]:
        return [f"{n}.weight" for n in self.module_names(lm, hp)]

    @staticmethod
    def shape(lm, name: str) -> tuple[int, int]:
        """(d_in, d_out) of a module: the original's normaliser key (``get_shape``)."""
        W, transposed = weight_param(lm.model, f"{name}.weight")
        return (W.shape[0], W.shape[1]) if transposed else (W.shape[1], W.shape[0])

    # ------------------------------------------------------------------ keys and gradients
    def read(self, lm, turn: _Turn, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Keys and output gradients [N, d] of every edited module at the read positions (rows in
        ``turn`` order): whole sub-batches per forward and backward pass, as many as fit
        ``tokens_per_pass`` padded tokens (rows are sorted by length, so little is padding)."""
        weight = [0.0] * len(turn.ids)
        for c in turn.chunks:
            for i in c:
                weight[i] = 1.0 / sum(len(turn.labels[j]) for j in c)
        groups, start = [], 0
        for c in turn.chunks:  # consecutive sub-batches; a group's first row is its longest
            if c.stop > start and (c.stop - start) * len(turn.ids[start]) > self.tokens_per_pass and c.start > start:
                groups.append(range(start, c.start))
                start = c.start
        groups.append(range(start, len(turn.ids)))
        keys: dict[str, list] = {n: [] for n in names}
        grads: dict[str, list] = {n: [] for n in names}
        for g in groups:
            k, gr = self._read_rows(lm, turn, names, list(g), weight)
            for n in names:
                keys[n].append(k[n])
                grads[n].append(gr[n])
        return {n: torch.cat(keys[n]) for n in names}, {n: torch.cat(grads[n]) for n in names}

    tokens_per_pass: ClassVar[int] = 512

    @staticmethod
    def _read_rows(lm, turn: _Turn, names: list[str], rows: list[int], weight: list[float]):
        model, tok = lm.model, lm.tokenizer
        device = next(model.parameters()).device
        ids, mask = right_pad([turn.ids[i] for i in rows], tok.pad_token_id if tok.pad_token_id is not None else 0,
                              device)
        lab = [turn.label_pos[i] for i in rows]
        lrow = torch.tensor([j for j, p in enumerate(lab) for _ in p], device=device)
        lpos = torch.tensor([q for p in lab for q in p], device=device)
        ltgt = torch.tensor([t for i in rows for t in turn.labels[i]], device=device)
        lw = torch.tensor([weight[i] for i, p in zip(rows, lab) for _ in p], device=device)
        rd = [turn.read_pos[i] for i in rows]
        rrow = torch.tensor([j for j, p in enumerate(rd) for _ in p], device=device)
        rpos = torch.tensor([q for p in rd for q in p], device=device)
        keys, outs, hooks = {}, {}, []

        def pre(name):
            def hook(mod, args):
                keys[name] = args[0].detach()[rrow, rpos].float()
            return hook

        def post(name):
            def hook(mod, args, out):
                if not out.requires_grad:  # the lowest edited module: the graph starts here
                    out = out.detach().requires_grad_()
                outs[name] = out
                return out
            return hook

        for name in names:
            mod = model.get_submodule(name)
            hooks += [mod.register_forward_pre_hook(pre(name)), mod.register_forward_hook(post(name))]
        try:
            with torch.enable_grad():
                h = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = output_logits(model)(h[lrow, lpos]).float()
                loss = (F.cross_entropy(logits, ltgt, reduction="none") * lw).sum()
                grads = torch.autograd.grad(loss, [outs[n] for n in names])
        finally:
            for hk in hooks:
                hk.remove()
        return keys, {n: g[rrow, rpos].float() for n, g in zip(names, grads)}

    def read_reference(self, lm, turn: _Turn, names: list[str]):
        """The original step by step: one forward/backward per sub-batch with full logits, the edited
        weights requiring gradients and module hooks (``util.TracerDict``); keys per sub-batch."""
        model = lm.model
        device = next(model.parameters()).device
        params = [model.get_submodule(n).weight for n in names]
        keys = {n: [] for n in names}
        grads = {n: [] for n in names}
        for p in params:
            p.requires_grad_(True)
        try:
            for c in turn.chunks:
                rows = list(c)
                ids, mask = right_pad([turn.ids[i] for i in rows], 0, device)
                labels = torch.full_like(ids, -100)
                read = torch.zeros_like(mask, dtype=torch.bool)
                for j, i in enumerate(rows):
                    labels[j, turn.label_pos[i]] = torch.tensor(turn.labels[i], device=device)
                    read[j, turn.read_pos[i]] = True
                where = torch.where(read)
                got: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
                hooks = []
                for n in names:
                    mod = model.get_submodule(n)
                    hooks.append(mod.register_forward_hook(
                        lambda m, a, o, n=n: got[n].__setitem__("k", a[0][where].detach())))
                    hooks.append(mod.register_full_backward_hook(
                        lambda m, gi, go, n=n: got[n].__setitem__("g", go[0][where].detach())))
                try:
                    with torch.enable_grad(), warnings.catch_warnings():
                        # the hooks fire for the module outputs' gradients, which is all we read
                        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
                        logits = model(input_ids=ids, attention_mask=mask).logits
                        at = torch.where(labels != -100)
                        F.cross_entropy(logits[at].float(), labels[at]).backward()
                finally:
                    for hk in hooks:
                        hk.remove()
                for n in names:
                    keys[n].append(got[n]["k"].float())
                    grads[n].append(got[n]["g"].float())
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        return keys, grads

    # ------------------------------------------------------------------ the turn
    def edit(self, lm, requests, hp, state, templates, *, targets=None, trace=None, backend="fast", progress=False):
        if targets is not None:
            raise EditfastError("ultraedit optimises no target vectors; it takes no targets")
        trace = {} if trace is None else trace
        requests = list(requests)
        names = self.module_names(lm, hp)
        turn = encode_turn(lm.tokenizer, requests, hp)
        sizes = [sum(len(turn.read_pos[i]) for i in c) for c in turn.chunks]
        if backend == "fast":
            keys, grads = self.read(lm, turn, names)
            bounds = torch.tensor([0] + sizes).cumsum(0).tolist()
            per_chunk = {n: ([keys[n][a:b] for a, b in zip(bounds, bounds[1:])],
                             [grads[n][a:b] for a, b in zip(bounds, bounds[1:])]) for n in names}
        else:
            k, g = self.read_reference(lm, turn, names)
            per_chunk = {n: (k[n], g[n]) for n in names}
            keys, grads = {n: torch.cat(k[n]) for n in names}, {n: torch.cat(g[n]) for n in names}
        shapes = {n: self.shape(lm, n) for n in names}
        stats = {}
        for s in dict.fromkeys(shapes.values()):
            stats[s] = self._stats(state, s, sum(s), keys[names[0]].device)
        for c in range(len(turn.chunks)):  # sub-batch by sub-batch, module by module (Q3)
            for n in names:
                x = torch.cat([per_chunk[n][0][c], per_chunk[n][1][c]], 1)
                stats[shapes[n]] = running_update(*stats[shapes[n]], x)
        for s, (cnt, mean, var) in stats.items():
            key = f"norm.{s[0]}x{s[1]}"
            state.set(f"{key}.n", cnt)
            state.set(f"{key}.mean", mean)
            state.set(f"{key}.var", var)
        updates = []
        for n in names:
            cnt, mean, var = stats[shapes[n]]
            std = running_std(cnt, var)
            if backend == "fast":
                values = pseudo_targets(keys[n], grads[n], mean, std, hp.lr)
                up = ridge_update(f"{n}.weight", keys[n], values, hp.ridge_lambda)
            else:
                up = self._reference_solve(f"{n}.weight", keys[n], grads[n], mean, std, hp)
            trace.update({f"keys.{n}": keys[n], f"grads.{n}": grads[n]})
            updates.append(up)
        trace["positions"] = keys[names[0]].shape[0]
        yield updates  # all from the same pass, applied together

    @staticmethod
    def _stats(state: State, shape: tuple[int, int], size: int, device) -> tuple[torch.Tensor, ...]:
        key = f"norm.{shape[0]}x{shape[1]}"
        get = state.tensors.get
        n = get(f"{key}.n")
        if n is None:
            return (torch.zeros(1, device=device), torch.zeros(size, device=device), torch.zeros(size, device=device))
        return n.to(device), get(f"{key}.mean").to(device), get(f"{key}.var").to(device)

    @staticmethod
    def _reference_solve(weight, keys, grads, mean, std, hp, block: int = 128) -> Dense:
        """``predict_param_shifts`` as written: normalise in zero-padded blocks of 128 rows, then the
        float32 primal solve (KᵀK + λI) P = Kᵀ V; ΔW = Pᵀ."""
        d_in = keys.shape[1]
        v = []
        for s in range(0, keys.shape[0], block):
            k, g = keys[s: s + block], grads[s: s + block]
            pad = block - k.shape[0]
            k, g = F.pad(k, (0, 0, 0, pad)), F.pad(g, (0, 0, 0, pad))
            z = (torch.cat([k, g], -1) - mean) / (std + EPS32)
            k_hat, g_hat = z.split([d_in, g.shape[1]], -1)
            v.append(-hp.lr * (k_hat * k_hat).sum(-1, keepdim=True) * g_hat)
        v = torch.cat(v)[: keys.shape[0]]
        mat = keys.T @ keys + hp.ridge_lambda * torch.eye(d_in, device=keys.device)
        return Dense(weight, torch.linalg.solve(mat, keys.T @ v).T.contiguous())


METHOD = UltraEdit()
