"""GRACE (Hartvigsen et al., NeurIPS 2023): a codebook at one layer that the model routes through;
the weights are never changed.

One module (an MLP projection of one decoder layer) gets a codebook of keys (its inputs), values
(outputs that replace its own) and deferral radii ε. Editing a request reads the module's input at
the request's last prompt token (the query) and updates the codebook (``codebook_step``):

- no key, or the nearest key farther than ``eps`` + its radius: a new key at the query, radius ``eps``;
- the nearest key close enough but with another label (target): a new key, and the two radii split
  the distance d between them: the old one d/2 − 1e-5, the new one d/2;
- the nearest key with the same label: nothing new; if the query lies outside its radius the ball
  grows to reach it (``eps_expand="coverage"``: radius d; ``"moving_average"``: the key moves
  halfway to the query and the radius becomes d).

Then the value of the key the query falls on is trained: ``n_iter`` Adam steps (lr ``edit_lr``) on
the cross-entropy of the target tokens, the module's output at the query's position replaced by the
value (``replacement="replace_last"``). A new key's value starts at uniform noise in [0, 1)
(``val_init="cold"``) or at the module's output there (``"warm"``). At inference every token whose
module input has its nearest key within that key's radius gets the key's value as the module's
output (``editfast.models.routing.Codebook``, installed on the model by ``install``).

What the originals do (github.com/Thartvigsen/GRACE ``grace/editors/grace.py``; EasyEdit's
``easyeditor/models/grace/GRACE.py``, ``grace_main.py``, ``utils.py``, ``hparams/GRACE/*.yaml``),
and what is kept:

- the module: EasyEdit's ``inner_params`` (Llama-2/Qwen/GPT-J: the MLP's output projection of a
  late layer; GPT-2 XL: ``c_fc``, the MLP's input projection, of layer 35); the query is that
  module's input at the last prompt token (both originals: key_id = the number of masked label
  positions − 1, i.e. the last token of the prompt, not the last subject token);
- the text is the prompt, a space and the target; labels are the target's tokens (the prompt's
  tokens counted by tokenising the prompt alone); the loss is the model's mean cross-entropy over
  them; distances are Euclidean (``torch.cdist``) in float32; ε, the split (with its 1e-5) and both
  expansion rules as written; Adam over the values with a fresh optimiser per edit.

Deviations, and why:

- D1 inference routes every token by its own input (``Codebook.route``). EasyEdit looks up one
  position per sequence, ``min(key_id, length − 1)`` with the key_id left over from the *last*
  edit, so after a stream of edits other prompts are read at a stale position; the authors' code
  reads the last prompt token of each input (known from its labels). Token-wise routing reads that
  token too, needs no labels at inference, and is what a padded batch, a KV cache and generation
  can compute; it differs where an edited prompt's last token recurs inside a longer input (it is
  routed there as well). Training routes only the query's position, as both originals.
- D2 labels are compared as the target's token ids. The originals compare the mean of the whole
  label tensor (prompt positions as −100 included), so one target after prompts of different
  lengths counts as a conflict; EasyEdit also prepends each new label to the label list while it
  appends the key, so labels and keys drift apart. Neither is kept.
- D3 the prompt is tokenised as editfast's evaluation engine reads it (no special tokens), so a
  key is exactly the query the engine computes; the originals add the tokenizer's special tokens (a
  BOS for Llama), as their own evaluation does. SmolLM2's tokenizer adds none: identical there.
- D4 a batch of several requests: the codebook is updated request by request (in order), then the
  chosen values are trained together in one padded forward per step, the loss the sum of each
  request's mean cross-entropy (Adam is elementwise: each value moves as if trained alone, up to
  float rounding; two requests of one batch on the same key train it together). The default batch
  is 1, the originals' edit.
- D5 ``replacement``: ``replace_last`` only (all of EasyEdit's files). ``replace_all`` /
  ``replace_prompt`` replace many positions depending on one lookup per sequence, which token-wise
  routing does not have; they are refused. ``val_train="adv"`` (noise-perturbed values, unused by
  every shipped file) is refused too; ``val_reg``, ``reg``, ``num_pert`` and ``dropout`` are read
  and, as in the originals, unused.
- D6 a cold value's noise comes from a generator seeded by the request (its prompt and target), so
  a run is reproducible and resume/undo are bit-identical.

The codebook is session state: ``State.tensors`` ``codebook.{keys,values,eps,labels}``, and each
batch journals only the rows it wrote (``rows``, ``keys``, ``values``, ``eps``, ``labels``);
``restore_state`` writes them back in batch order, so resume and undo rebuild it exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from editfast.core.errors import EditfastError, HParamsError
from editfast.engine.kv import right_pad
from editfast.methods.base import Method, State, matrix_module
from editfast.methods.hparams import HParams, check_inner_params, inner_params_module
from editfast.methods.locate_then_edit.targets import target_text
from editfast.models import routing
from editfast.models.archs import output_logits
from editfast.models.update import weight_param

SPLIT_MARGIN = 1e-5  # the originals' margin: the old key's radius becomes d/2 - 1e-5 on a conflict


@dataclass
class GraceHyperParams(HParams):
    # the routed module under the decoder layer of ``layers`` (one layer): "rewrite" (the model's MLP
    # output projection) or a dotted name ("mlp.c_fc"); EasyEdit's ``inner_params`` sets both
    layers: list[int] = field(default_factory=list)  # or named by inner_params
    module: str = "rewrite"
    inner_params: list[str] | None = None
    edit_lr: float = 1.0
    n_iter: int = 50
    eps: float = 1.0  # the initial deferral radius ε
    dist_fn: str = "euc"
    val_init: str = "cold"
    val_train: str = "sgd"
    val_reg: str | None = None  # read, unused (as the originals)
    reg: str | None = "early_stop"  # read, unused (as the originals)
    replacement: str = "replace_last"
    eps_expand: str = "coverage"
    num_pert: int = 8  # read, unused with val_train="sgd"
    dropout: float = 0.0  # read, unused (as the originals)

    RANGES: ClassVar[dict] = {"edit_lr": "> 0", "n_iter": ">= 1", "eps": ">= 0", "dist_fn": ("euc",),
                              "val_init": ("cold", "warm"), "val_train": ("sgd",),
                              "replacement": ("replace_last",), "eps_expand": ("coverage", "moving_average"),
                              "num_pert": ">= 0", "dropout": ">= 0 and <= 1"}

    def validate(self) -> None:
        if self.inner_params is not None:
            layer, self.module = inner_params_module(self.inner_params, "GRACE")
            self.layers = [layer]
        super().validate()
        if len(self.layers) != 1:
            raise HParamsError(f"hparams: layers={self.layers} must name one layer (GRACE routes one module)")
        if not self.module or self.module != self.module.strip() or self.module.startswith(".") \
                or self.module.endswith("."):
            raise HParamsError(f"hparams: module={self.module!r} must be 'rewrite' or a dotted module name under "
                               "the decoder layer (e.g. 'mlp.down_proj')")

    def check_modules(self, adapter) -> None:
        if self.inner_params is not None:
            check_inner_params(self.inner_params, self.layers[0], adapter)


# -----------------------------------------------------------------------------------------------
# the codebook's equations (dtype-generic; tests check them in float64)


@dataclass
class Step:
    """What one request did to the codebook: the new tensors, the row it trains, the rows it wrote."""

    keys: torch.Tensor
    eps: torch.Tensor
    labels: torch.Tensor
    chosen: int  # the key the query falls on after the step (its value is trained)
    hit: bool  # the query within the chosen key's radius (it always is after a step)
    new: bool  # a key was added (the last row)
    written: list[int] = field(default_factory=list)


def nearest(keys: torch.Tensor, query: torch.Tensor) -> tuple[float, int]:
    """Distance to, and index of, the key nearest ``query`` [d] (Euclidean, ``torch.cdist``)."""
    d, j = torch.cdist(query[None], keys)[0].min(0)
    return float(d), int(j)


def codebook_step(keys: torch.Tensor, eps: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, label: int,
                  init_eps: float, expand: str = "coverage") -> Step:
    """GRACE's codebook update for one query [d] with label ``label`` (the originals' iteration-0
    branch); keys [K, d], eps [K], labels [K] are not changed (new tensors are returned)."""
    keys, eps, labels = keys.clone(), eps.clone(), labels.clone()
    new_row = len(keys)

    def add():
        return (torch.cat([keys, query[None].to(keys.dtype)]), torch.cat([eps, eps.new_tensor([init_eps])]),
                torch.cat([labels, labels.new_tensor([label])]))

    written: list[int] = []
    if not len(keys):
        keys, eps, labels = add()
        written = [new_row]
    else:
        d, j = nearest(keys, query.to(keys.dtype))
        if d > init_eps + float(eps[j]):
            keys, eps, labels = add()
            written = [new_row]
        elif int(labels[j]) != label:  # a conflict: both balls split the distance
            keys, eps, labels = add()
            eps[j] = d / 2 - SPLIT_MARGIN
            eps[-1] = d / 2
            written = [j, new_row]
        elif d > float(eps[j]):  # the same label, outside the ball: the ball grows to reach the query
            if expand == "moving_average":
                keys[j] = 0.5 * keys[j] + 0.5 * query.to(keys.dtype)
            eps[j] = d
            written = [j]
    d, c = nearest(keys, query.to(keys.dtype))
    return Step(keys, eps, labels, c, d <= float(eps[c]), len(keys) > new_row, sorted(set(written) | {c}))


def label_id(tokens: Sequence[int]) -> int:
    """A request's label: its target's token ids as one int64 (sha256's first 8 bytes)."""
    h = hashlib.sha256(",".join(map(str, tokens)).encode()).digest()
    return int.from_bytes(h[:8], "little", signed=True)


# -----------------------------------------------------------------------------------------------
# the method


@dataclass
class _Batch:
    ids: list[list[int]]  # prompt + " " + target
    key_pos: list[int]  # the last prompt token
    targets: list[list[int]]
    labels: list[int]
    seeds: list[int]


def encode(tok, requests) -> _Batch:
    """As the engine reads a prompt (no special tokens), the text EasyEdit builds (prompt, space, target)."""
    ids, pos, tgts, labels, seeds = [], [], [], [], []
    for r in requests:
        prompt = r.filled()
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        whole = tok(prompt + target_text(r.target_new), add_special_tokens=False)["input_ids"]
        t = whole[len(p):]
        if not p or not t:
            raise EditfastError(f"request {r.case_id}: its prompt or target tokenises to nothing")
        ids.append(whole)
        pos.append(len(p) - 1)
        tgts.append(t)
        labels.append(label_id(t))
        seeds.append(int.from_bytes(hashlib.sha256(f"{prompt}\0{r.target_new}".encode()).digest()[:7], "little"))
    return _Batch(ids, pos, tgts, labels, seeds)


class Grace(Method):
    name = "grace"
    summary = ("a codebook of keys and values at one layer the model routes through, weights untouched "
               "(Hartvigsen et al., 2023)")
    hparams_class = GraceHyperParams
    presets: ClassVar[dict] = {
        # EasyEdit's hparams/GRACE files (the authors' gpt2-xl config: the same layer, n_iter 100)
        "gpt2-xl": {"layers": [35], "module": "mlp.c_fc", "edit_lr": 1.0, "n_iter": 200, "eps": 1.0},
        "gpt-j-6b": {"layers": [25], "module": "mlp.fc_out", "edit_lr": 1.0, "n_iter": 200, "eps": 1.0},
        "llama-2-7b": {"layers": [27], "module": "mlp.down_proj", "edit_lr": 1.0, "n_iter": 50, "eps": 1.0},
        "smollm2-135m": {"layers": [25], "module": "mlp.down_proj", "edit_lr": 1.0, "n_iter": 10, "eps": 1.0},
        "tiny": {"layers": [1], "module": "mlp.down_proj", "edit_lr": 1.0, "n_iter": 10, "eps": 1.0},
    }
    default_batch_size = 1  # the originals edit one request at a time
    easyedit_alg = "GRACE"
    routes = True

    def module_name(self, lm, hp) -> str:
        return matrix_module(lm, hp.layers[0], hp.module, "module")

    def sites(self, lm, hp) -> list[str]:
        return [f"{self.module_name(lm, hp)}.weight"]  # never written: its drift is reported (zero)

    def prepare(self, lm, hp, progress: bool = True) -> State:
        name = self.module_name(lm, hp)
        if name in routing.routes(lm.model):
            raise EditfastError(f"the model already routes {name} through a memory (an earlier session's or a saved "
                                "model's): start from the base model (editfast.models.routing.uninstall, or load it "
                                "again); to continue a run, resume it")
        return State()

    # ---- state
    @staticmethod
    def codebook(state: State, lm, name: str) -> tuple[torch.Tensor, ...]:
        t = state.tensors
        if "codebook.keys" in t:
            return t["codebook.keys"], t["codebook.values"], t["codebook.eps"], t["codebook.labels"]
        W, transposed = weight_param(lm.model, f"{name}.weight")
        d_in, d_out = (W.shape[0], W.shape[1]) if transposed else (W.shape[1], W.shape[0])
        dev = W.device
        return (torch.zeros(0, d_in, device=dev), torch.zeros(0, d_out, device=dev), torch.zeros(0, device=dev),
                torch.zeros(0, dtype=torch.long, device=dev))

    def restore_state(self, state: State, journaled: dict[str, torch.Tensor]) -> None:
        """A batch's written rows back into the codebook (rows past its end extend it)."""
        if "rows" not in journaled:
            return
        rows = journaled["rows"].long()
        size = int(rows.max()) + 1 if len(rows) else 0
        t = state.tensors
        for key in ("keys", "values", "eps", "labels"):
            new = journaled[key]
            old = t.get(f"codebook.{key}")
            if old is None:
                old = new.new_zeros((0, *new.shape[1:]))
            if size > len(old):
                old = torch.cat([old, old.new_zeros((size - len(old), *old.shape[1:]))])
            else:
                old = old.clone()
            old[rows.to(old.device)] = new.to(old.device, old.dtype)
            t[f"codebook.{key}"] = old

    def install(self, lm, hp, state: State) -> None:
        name = self.module_name(lm, hp)
        t = state.tensors
        if not len(t.get("codebook.keys", ())):
            routing.uninstall(lm.model, name)
            return
        routing.install(lm.model, name, routing.Codebook(t["codebook.keys"], t["codebook.values"], t["codebook.eps"]))

    def memory_size(self, state: State) -> dict[str, int]:
        t = state.tensors
        return {"keys": len(t.get("codebook.keys", ())),
                "bytes": sum(t[f"codebook.{k}"].numel() * t[f"codebook.{k}"].element_size()
                             for k in ("keys", "values", "eps", "labels") if f"codebook.{k}" in t)}

    # ---- editing
    def edit(self, lm, requests, hp, state, templates, *, targets=None, trace=None, backend="fast", progress=False):
        if targets is not None:
            raise EditfastError("grace optimises no target vectors; it takes no targets")
        if backend not in ("fast", "reference"):
            raise EditfastError(f"backend must be 'fast' or 'reference', got {backend!r}")
        trace = {} if trace is None else trace
        name = self.module_name(lm, hp)
        batch = encode(lm.tokenizer, list(requests))
        keys, values, eps, labels = self.codebook(state, lm, name)
        groups = [list(range(len(batch.ids)))] if backend == "fast" else [[i] for i in range(len(batch.ids))]
        written: set[int] = set()
        losses = []
        for rows in groups:  # the reference: request by request, as the originals
            queries, outs = self._read(lm, name, batch, rows)
            chosen, hits, init = [], [], {}
            for k, i in enumerate(rows):  # the codebook, request by request (D4)
                s = codebook_step(keys, eps, labels, queries[k], batch.labels[i], hp.eps, hp.eps_expand)
                keys, eps, labels = s.keys, s.eps, s.labels
                if s.new:
                    values = torch.cat([values, self._init_value(hp, outs[k], batch.seeds[i], values)[None]])
                written.update(s.written)
                chosen.append(s.chosen)
                hits.append(s.hit)
            slots = sorted(set(chosen))
            init = values[slots]
            trained, loss = self._train(lm, name, batch, rows, [slots.index(c) for c in chosen], hits, init, hp)
            values = values.clone()
            values[slots] = trained
            losses.append(loss)
        rows_t = torch.tensor(sorted(written), dtype=torch.long, device=keys.device)
        for key, full in (("keys", keys), ("values", values), ("eps", eps), ("labels", labels)):
            state.tensors[f"codebook.{key}"] = full
            state.set(key, full[rows_t])
        state.set("rows", rows_t)
        trace["losses"] = losses
        trace["keys"] = len(keys)
        yield []  # no weight changes: the session installs the codebook (``install``)

    @staticmethod
    def _init_value(hp, out: torch.Tensor, seed: int, values: torch.Tensor) -> torch.Tensor:
        if hp.val_init == "warm":
            return out.to(values.dtype)
        g = torch.Generator().manual_seed(seed)
        return torch.rand(values.shape[1], generator=g).to(values.device, values.dtype)

    @staticmethod
    def _forward(lm, batch: _Batch, rows: list[int]):
        tok = lm.tokenizer
        ids, mask = right_pad([batch.ids[i] for i in rows], tok.pad_token_id if tok.pad_token_id is not None else 0,
                              next(lm.model.parameters()).device)
        return ids, mask

    def _read(self, lm, name: str, batch: _Batch, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's input (queries, float32) and output at each row's last prompt token."""
        ids, mask = self._forward(lm, batch, rows)
        got = {}
        r = torch.arange(len(rows), device=ids.device)
        pos = torch.tensor([batch.key_pos[i] for i in rows], device=ids.device)

        def hook(mod, args, out):
            got["q"], got["o"] = args[0][r, pos].detach().float(), out[r, pos].detach().float()

        h = lm.model.get_submodule(name).register_forward_hook(hook)
        try:
            with torch.no_grad(), routing.bypassed(lm.model):
                lm.model.base_model(input_ids=ids, attention_mask=mask)
        finally:
            h.remove()
        return got["q"], got["o"]

    def _train(self, lm, name: str, batch: _Batch, rows: list[int], slot_of: list[int], hits: list[bool],
               init: torch.Tensor, hp) -> tuple[torch.Tensor, float]:
        """``n_iter`` Adam steps on the values ``init`` [S, d_out]: each row's module output at its last
        prompt token is its slot's value (where its query is within the radius); the loss is the sum
        over rows of the mean cross-entropy of the row's target tokens."""
        model = lm.model
        ids, mask = self._forward(lm, batch, rows)
        dev = ids.device
        r = torch.arange(len(rows), device=dev)
        pos = torch.tensor([batch.key_pos[i] for i in rows], device=dev)
        slot = torch.tensor(slot_of, device=dev)
        hit = torch.tensor(hits, device=dev)
        lrow = torch.tensor([j for j, i in enumerate(rows) for _ in batch.targets[i]], device=dev)
        lpos = torch.tensor([batch.key_pos[i] + t for i in rows for t in range(len(batch.targets[i]))], device=dev)
        ltgt = torch.tensor([t for i in rows for t in batch.targets[i]], device=dev)
        lw = torch.tensor([1.0 / len(batch.targets[i]) for i in rows for _ in batch.targets[i]], device=dev)
        V = torch.nn.Parameter(init.detach().clone().float())
        opt = torch.optim.Adam([V], lr=hp.edit_lr)

        def hook(mod, args, out):
            here = out[r, pos]
            return out.index_put((r, pos), torch.where(hit[:, None], V[slot].to(out.dtype), here))

        head = output_logits(model)
        h = model.get_submodule(name).register_forward_hook(hook)
        loss = torch.zeros(())
        try:
            with torch.enable_grad(), routing.bypassed(model):
                for _ in range(hp.n_iter):
                    hid = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                    ce = F.cross_entropy(head(hid[lrow, lpos]).float(), ltgt, reduction="none")
                    loss = (ce * lw).sum()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            h.remove()
        return V.detach().to(init.dtype), float(loss.detach())


METHOD = Grace()
