"""KN, knowledge neurons (Dai et al., 2022), as an editing method the way EasyEdit runs it
(EasyEdit's ``models/kn`` wraps a copy of EleutherAI's ``knowledge-neurons``; Gu et al., 2024
measure KN through it).

One fact at a time, on the model as edited so far:

1. Attribution. For every MLP neuron i of every layer in ``layers``: integrated gradients of the
   probability of the fact's current answer (``target_true``) at the prompt's last position,
   with the neuron's activation a scaled from 0 to itself,

       score_i = a_i / steps · Σ_k ∂p(answer) / ∂x_i |_{x = α_k a},   α_k = k / (steps − 1)

   (the grid is ``torch.linspace(0, 1, steps)``: both ends included, so ``steps=1`` is the single
   gradient at α = 0). Only the last position is scaled; the other positions keep their activations.
2. Selection. Neurons with score > adaptive_threshold · max score (over all layers); over several
   prompts, with ``refine``, those found for more than p · n_prompts of them, else the union.
3. Edit. Each selected neuron's output weights (its column of the down projection, logical
   [out, in]) get Σ_j E[t_j] − Σ_i E[g_i], E the input word embedding, t the target's tokens and g
   the model's greedy continuation of the prompt, as many tokens as the target has, with a factor
   2 on E[g_0] when the target is one token (see quirks). Returned as one ``Sparse`` update per
   layer, so the session journals and undoes it.

Fast path (``backend="fast"``): every integration step of every layer (``layers_per_pass`` at a
time, 0 = all) in ONE batched forward/backward of the prompt's last token over the cached prefix
(keys/values of the other positions do not depend on the patched activation: the model is
causal), leaf X[layer, step] = α_step · a_layer, and one gradient. The original runs a full-prompt
forward/backward per layer and per chunk of ``batch_size`` steps; ``backend="reference"`` does
exactly that (tests and bench compare the two). Several target tokens without re-tokenising
share one pass: the mean of their probabilities is differentiated (the original averages the
per-token integrals, which is the same number since the activations are the same).

Quirks of the original reproduced here (EasyEdit at 14cea82, knowledge-neurons at be1a84a):

- The patched activation is the output of the MLP's input projection (EasyEdit's
  ``input_ff_attr``: GPT-2 ``c_fc``, GPT-J ``fc_in``, Llama ``gate_proj``), i.e. the
  pre-activation, and for gated MLPs the gate before SiLU, not the input of the down projection
  the paper defines neurons on. ``activation="down_in"`` takes the paper's site instead.
- The answer and target strings are tokenised as given, ``tokenizer.encode(target)`` with the
  tokenizer's special tokens, WITHOUT the leading space the metrics (and EasyEdit's own
  evaluation) score: the neurons of "Oslo" and the embedding of "Rome", not " Oslo" / " Rome".
  With a tokenizer that adds BOS (Llama-2) the first "target token" is BOS. ``target_prefix=" "``
  tokenises " " + target instead.
- Multi-token answers: one integral per answer token, averaged. For Llama/Qwen the prompt is
  re-tokenised with the clean model's greedy token appended before each next token
  (``retokenize``); for GPT-2/GPT-J the condition ``model_type == "gpt"`` never holds, so every
  answer token is scored at the same prompt position (``retokenize=False`` in their presets).
- The edit's scales are asymmetric: EasyEdit indexes the embedding with the target's token LIST
  (always 2-D: each target token added once) and with the greedy token as an int when the target
  has one token (1-D: subtracted twice), else with the list (each subtracted once). The original
  knowledge-neurons (BERT only) used −2·E[orig] + 2·E[target].
- EasyEdit passes only the request's prompt (no paraphrases), and every published preset has
  ``refine: false``, so the selected neurons are all neurons over the threshold.
  ``refine_paraphrases=True`` adds the request's paraphrase prompts (beware: they are what the
  generalisation metric scores).
- ``lr_scale`` and ``n_toks`` are read by EasyEdit but never used. Here ``lr_scale`` multiplies
  the edit (1.0, every preset, is the original); ``n_toks`` is accepted and unused.
- Probabilities, not log-probabilities; the threshold is strict (score > t).

Presets: gpt2-xl, gpt-j-6b and llama-2-7b are EasyEdit's ``hparams/KN/{gpt2-xl,gpt-j-6B,
llama-7b}.yaml`` (all layers; llama-7b.yaml points at llama-2-7b and integrates with one step,
batch 1; gpt-j's threshold is 0.1), with ``retokenize`` as EasyEdit's branch for that family.
"tiny" (random 4-layer models): all layers, 4 steps in batches of 2.

SmolLM2-135M: the gpt2-xl file's integration (20 steps, batches of 20, threshold 0.2) with the
Llama branch (``retokenize=True``, tokenisation as EasyEdit), chosen on held-out facts with
``bench/tune_kn.py``; the rule, the settings tried and what they measured are in
bench/RESULTS.md ("KN: the SmolLM2 preset").
"""

from __future__ import annotations

import collections
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch

from editfast.core.compat import cache_kwargs, output_cache
from editfast.core.errors import HParamsError, ModelError, RequestError
from editfast.engine.kv import kv_cache
from editfast.methods.base import Method, State
from editfast.methods.hparams import HParams
from editfast.models.trace import LayerRest, SkipBelow, Trace
from editfast.models.update import Sparse


@dataclass
class KNHyperParams(HParams):
    steps: int = 20  # integration steps (α on linspace(0, 1, steps))
    batch_size: int = 20  # the original's steps per forward (the reference path); must divide steps
    adaptive_threshold: float = 0.2  # keep scores > adaptive_threshold · max score
    p: float = 0.4  # refine: keep neurons found for more than p · n_prompts prompts
    refine: bool = False
    refine_paraphrases: bool = False  # also attribute on the request's paraphrase prompts (not EasyEdit)
    lr_scale: float = 1.0  # scales the edit (EasyEdit reads it and ignores it: 1.0 is the original)
    n_toks: int = 10  # read by EasyEdit, unused there and here
    retokenize: bool = True  # multi-token answers: append the greedy token and re-tokenise (Llama branch)
    target_prefix: str = ""  # "" tokenises the target as given (EasyEdit); " " as the metrics score it
    activation: str = "mlp_in"  # "mlp_in": output of the MLP's input projection (EasyEdit); "down_in": paper
    layers_per_pass: int = 0  # fast path: layers per batched forward/backward; 0: auto (see layers_per_pass)

    RANGES: ClassVar[dict] = {
        "steps": ">= 1", "batch_size": ">= 1", "adaptive_threshold": "> 0 and <= 1", "p": ">= 0 and < 1",
        "lr_scale": "> 0", "n_toks": ">= 1", "target_prefix": ("", " "), "activation": ("mlp_in", "down_in"),
        "layers_per_pass": ">= 0",
    }

    def validate(self) -> None:
        super().validate()
        if self.steps % self.batch_size:
            raise HParamsError(f"hparams: batch_size={self.batch_size} must divide steps={self.steps} (the original "
                               "integrates in steps / batch_size equal chunks)")


# ------------------------------------------------------------------------------------------- sites


def _site(lm, hp: KNHyperParams, layer: int) -> tuple[str, str]:
    """(module name, "out" | "in"): the activation KN scales is that module's output or input."""
    if hp.activation == "mlp_in":
        if not lm.adapter.mlp_in_tmp:
            raise ModelError(f"KN: the {lm.adapter.family} adapter names no MLP input projection")
        return lm.adapter.mlp_in_tmp.format(layer), "out"
    return lm.adapter.rewrite_tmp.format(layer), "in"


@contextmanager
def _patched(model, sites: Sequence[tuple[str, str]], fns: Sequence[Callable[[torch.Tensor], torch.Tensor]]):
    """Replace each site's activation x [B, T, d] by fn(x) during the block."""
    handles = []
    for (name, kind), fn in zip(sites, fns):
        mod = model.get_submodule(name)
        if kind == "out":
            handles.append(mod.register_forward_hook(lambda m, a, out, fn=fn: fn(out)))
        else:
            handles.append(mod.register_forward_pre_hook(lambda m, a, fn=fn: (fn(a[0]), *a[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _replace_last(x: torch.Tensor, rows: slice, values: torch.Tensor) -> torch.Tensor:
    """x with its last position's activations of batch ``rows`` set to ``values`` (a new tensor)."""
    last = x[:, -1]
    last = torch.cat([last[: rows.start], values.to(x.dtype), last[rows.stop:]])
    return torch.cat([x[:, :-1], last[:, None]], 1)


def alphas(steps: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The original's integration grid: ``torch.linspace(0, 1, steps)`` (0 and 1 included)."""
    return torch.linspace(0, 1, steps, device=device, dtype=dtype)


def encode_prompt(tok, text: str) -> list[int]:
    """``tokenizer(prompt)`` as the original calls it (the tokenizer's special tokens included)."""
    return list(tok(text)["input_ids"])


# ------------------------------------------------------------------------------------- attribution


@torch.no_grad()
def _clean_pass(lm, ids: list[int], sites, starts: Sequence[int] = ()):
    """One unpatched forward of the whole prompt: the activations at its last position at every
    site [G, d], the last position's logits [V], the prefix's keys/values per layer (None for a
    one-token prompt), and for each layer in ``starts`` its input hidden state at the last position
    with what the decoder layers return beside it (for ``SkipBelow``)."""
    model, adapter = lm.model, lm.adapter
    layer_names = [adapter.layer_tmp.format(l) for l in starts]
    ins = [n for n, k in sites if k == "in"]
    outs = [n for n, k in sites if k == "out"]
    with (LayerRest(model.get_submodule(adapter.layer_tmp.format(0))) if starts else nullcontext()) as rest, \
            Trace(model, inputs=ins + layer_names, outputs=outs) as tr:
        out = model(input_ids=torch.tensor([ids], device=lm.device), use_cache=len(ids) > 1)
    acts = torch.stack([(tr.inputs if k == "in" else tr.outputs)[n][0, -1] for n, k in sites])
    kv = None
    if len(ids) > 1:
        kv = [(layer.keys[..., :-1, :], layer.values[..., :-1, :]) for layer in output_cache(out).layers]
    hidden = {l: tr.inputs[n][0, -1] for l, n in zip(starts, layer_names)}
    return acts, out.logits[0, -1], kv, (hidden, rest.rest if starts else None)


def _ig_batched(lm, ids: list[int], kv, sites, acts: torch.Tensor, answer: list[int], steps: int,
                start: int = 0, entry: tuple | None = None) -> torch.Tensor:
    """Integrated gradients at every site and step in one forward/backward of the last token over
    the cached prefix: rows g·steps .. (g+1)·steps − 1 scale site g's activation. [G, d].

    ``start`` > 0: no site lies below layer ``start``, so every row's hidden state entering it is
    the clean one (``entry``: the clean pass's hidden states and layer outputs' structure): the
    layers below are skipped (``SkipBelow``)."""
    model = lm.model
    G, T = len(sites), len(ids)
    B = G * steps
    a = alphas(steps, acts.device, acts.dtype)
    X = (a[None, :, None] * acts[:, None, :]).requires_grad_(True)  # [G, S, d]
    fns = [lambda x, g=g: _replace_last(x, slice(g * steps, (g + 1) * steps), X[g]) for g in range(G)]
    dev = acts.device
    tok_ids = torch.full((B, 1), ids[-1], device=dev, dtype=torch.long)
    kw = dict(position_ids=torch.full((B, 1), T - 1, device=dev, dtype=torch.long))
    if kv is not None:
        kw.update(cache_kwargs(model, kv_cache(model, kv, batch=B)), use_cache=True,
                  attention_mask=torch.ones(B, T, device=dev, dtype=torch.long))
    skip = nullcontext()
    if start > 0:
        skip = SkipBelow(model, lm.adapter, start - 1, entry[1])
        skip.h = entry[0][start].expand(B, 1, -1)
    with torch.enable_grad(), _patched(model, sites, fns), skip:
        logits = model(input_ids=tok_ids, **kw).logits[:, -1]
        probs = torch.softmax(logits, -1)
        loss = probs[:, answer].mean(1).sum()  # the mean over answer tokens of one position (see docstring)
        (grad,) = torch.autograd.grad(loss, X)
    return grad.sum(1) * acts / steps


def _ig_reference(lm, ids: list[int], site, act: torch.Tensor, token: int, steps: int, batch_size: int):
    """The original's loop for one site and one answer token: full-prompt forwards of
    ``batch_size`` integration steps each, the last position patched. [d]."""
    model = lm.model
    scaled = (alphas(steps, act.device, act.dtype)[:, None] * act[None]).requires_grad_(True)
    inputs = torch.tensor([ids], device=act.device).repeat(batch_size, 1)
    total = torch.zeros_like(act)
    for chunk in scaled.chunk(steps // batch_size):
        with torch.enable_grad(), _patched(model, [site], [lambda x: _replace_last(x, slice(0, len(x)), chunk)]):
            probs = torch.softmax(model(input_ids=inputs).logits[:, -1], -1)
            (grad,) = torch.autograd.grad(torch.unbind(probs[:, token]), scaled)
        total += grad.sum(0)  # rows outside this chunk have zero gradient
    return total * act / steps


def attribution_scores(lm, prompt: str, answer: str, hp: KNHyperParams, backend: str = "fast") -> torch.Tensor:
    """Integrated-gradient scores [len(hp.layers), d_mlp] of ``answer`` (tokenised as given) after
    ``prompt`` at the prompt's last position, averaged over the answer's tokens (the original's
    ``get_scores``)."""
    tok = lm.tokenizer
    answer_ids = list(tok.encode(answer))
    if not answer_ids:
        raise RequestError(f"KN: the answer {answer!r} has no tokens")
    sites = [_site(lm, hp, l) for l in hp.layers]
    scores, text = [], prompt
    for i in range(len(answer_ids) if hp.retokenize else 1):  # one unit per prompt position scored
        ids = encode_prompt(tok, text)
        scored = [answer_ids[i]] if hp.retokenize else answer_ids
        if backend == "fast":
            per = layers_per_pass(hp, len(sites), lm.device)
            chunks = [slice(s, s + per) for s in range(0, len(sites), per)]
            starts = [min(hp.layers[c]) for c in chunks]
            acts, logits, kv, entry = _clean_pass(lm, ids, sites, [l for l in starts if l > 0])
            scores.append(torch.cat([_ig_batched(lm, ids, kv, sites[c], acts[c], scored, hp.steps, start, entry)
                                     for c, start in zip(chunks, starts)]))
        else:  # the original's loops: per site and answer token, a baseline forward, then the integral
            rows = []
            for site in sites:
                per_token = []
                for t in scored:
                    acts, logits, _, _ = _clean_pass(lm, ids, [site])
                    per_token.append(_ig_reference(lm, ids, site, acts[0], t, hp.steps, hp.batch_size))
                rows.append(torch.stack(per_token).mean(0))
            scores.append(torch.stack(rows))
        text += tok.decode([int(logits.argmax())])  # the next unit's prompt (retokenize)
    return torch.stack(scores).mean(0)


CPU_ROWS = 128  # auto: rows (layers × steps) per pass on the CPU, where large batches measured slower


def layers_per_pass(hp: KNHyperParams, n_layers: int, device) -> int:
    """``hp.layers_per_pass``, or for 0 (auto) all layers on an accelerator and passes of about
    ``CPU_ROWS`` rows on the CPU (SmolLM2, 20 steps: 6 layers a pass took 16 s, all 30 in one 31 s)."""
    if hp.layers_per_pass:
        return hp.layers_per_pass
    return n_layers if torch.device(device).type != "cpu" else max(1, CPU_ROWS // hp.steps)


def coarse_neurons(scores: torch.Tensor, adaptive_threshold: float) -> list[tuple[int, int]]:
    """(row, neuron) of every score > adaptive_threshold · max score."""
    threshold = scores.max().item() * adaptive_threshold
    return [tuple(x) for x in torch.nonzero(scores > threshold).tolist()]


def refined_neurons(per_prompt: Sequence[Sequence[tuple[int, int]]], p: float, refine: bool) -> list[tuple[int, int]]:
    """The original's refinement: with ``refine``, neurons found for more than p · n_prompts
    prompts; else every neuron found (first-seen order)."""
    count = collections.Counter(n for neurons in per_prompt for n in neurons)
    t = len(per_prompt) * p
    return [n for n, c in count.items() if c > t or not refine]


# -------------------------------------------------------------------------------------------- edit


@torch.no_grad()
def greedy_tokens(lm, prompt: str, n: int) -> list[int]:
    """The original's ``_generate``: n greedy tokens, each decoded, appended to the prompt string
    and re-tokenised."""
    tok, out = lm.tokenizer, []
    for _ in range(n):
        ids = torch.tensor([encode_prompt(tok, prompt)], device=lm.device)
        g = int(lm.model(input_ids=ids).logits[0, -1].argmax())
        out.append(g)
        prompt += tok.decode([g])
    return out


def edit_vector(embedding: torch.Tensor, target_ids: Sequence[int], greedy_ids: Sequence[int]) -> torch.Tensor:
    """What every selected neuron's output column gains: Σ E[target] − Σ E[greedy], the greedy
    token counted twice when there is one (EasyEdit's ``modify_weights``, see the docstring)."""
    E = embedding.float()
    orig = 2 * E[greedy_ids[0]] if len(greedy_ids) == 1 else E[list(greedy_ids)].sum(0)
    return E[list(target_ids)].sum(0) - orig


def neuron_updates(lm, layers: Sequence[int], neurons: Sequence[tuple[int, int]], delta: torch.Tensor) -> list[Sparse]:
    """One Sparse update per layer: ``delta`` added to each selected neuron's column of the down
    projection (logical [out, in]; ``apply_update`` writes GPT-2's Conv1D rows)."""
    d_out, d_in = lm.adapter.d_model(lm.model), lm.adapter.d_mlp(lm.model)
    by_layer: dict[int, list[int]] = collections.defaultdict(list)
    for row, i in neurons:
        by_layer[layers[row]].append(i)
    out = []
    for layer in sorted(by_layer):
        cols = torch.tensor(sorted(by_layer[layer]), dtype=torch.long)
        index = (torch.arange(d_out)[:, None] * d_in + cols[None, :]).flatten()
        values = delta.detach().cpu()[:, None].expand(d_out, len(cols)).flatten().clone()
        out.append(Sparse(f"{lm.adapter.rewrite_tmp.format(layer)}.weight", (d_out, d_in), index, values))
    return out


class KN(Method):
    name = "kn"
    summary = "knowledge neurons: word embeddings added to the output weights of attributed neurons (Dai et al., 2022)"
    hparams_class = KNHyperParams
    presets = {
        # EasyEdit hparams/KN/gpt2-xl.yaml, gpt-j-6B.yaml, llama-7b.yaml; every layer.
        "gpt2-xl": dict(layers=list(range(48)), steps=20, batch_size=20, adaptive_threshold=0.2, p=0.4,
                        refine=False, lr_scale=1.0, n_toks=10, retokenize=False),
        "gpt-j-6b": dict(layers=list(range(28)), steps=20, batch_size=20, adaptive_threshold=0.1, p=0.4,
                         refine=False, lr_scale=1.0, n_toks=10, retokenize=False),
        "llama-2-7b": dict(layers=list(range(32)), steps=1, batch_size=1, adaptive_threshold=0.2, p=0.4,
                           refine=False, lr_scale=1.0, n_toks=10, retokenize=True),
        # SmolLM2 (Llama architecture): chosen on held-out facts (module docstring, bench/tune_kn.py).
        "smollm2-135m": dict(layers=list(range(30)), steps=20, batch_size=20, adaptive_threshold=0.2, p=0.4,
                             refine=False, lr_scale=1.0, n_toks=10, retokenize=True),
        "tiny": dict(layers=[0, 1, 2, 3], steps=4, batch_size=2, adaptive_threshold=0.2, p=0.4),
    }
    default_batch_size = 1
    max_batch_size = 1  # one fact at a time, each on the model as edited so far (as EasyEdit)

    def sites(self, lm, hp) -> list[str]:
        """The down projection of every layer in ``layers`` (the output weights of its neurons)."""
        return [f"{lm.adapter.rewrite_tmp.format(l)}.weight" for l in hp.layers]

    def edit(self, lm, requests, hp, state: State, templates, *, targets=None, trace=None, backend="fast",
             progress=False):
        trace = {} if trace is None else trace
        if backend not in ("fast", "reference"):
            raise RequestError(f"KN: backend must be 'fast' or 'reference', got {backend!r}")
        for r in requests:
            if not r.target_true:
                raise RequestError(f"request {r.case_id}: KN attributes the fact's current answer and needs "
                                   "target_true (a CounterFact-style request)")
        for r in requests:  # each on the model as edited by the ones before
            yield self._updates_one(lm, r, hp, backend, trace)

    def _updates_one(self, lm, r, hp, backend, trace) -> list[Sparse]:
        t0 = time.perf_counter()
        prompt = r.filled()
        prompts = [prompt] + (list(r.paraphrase_prompts) if hp.refine_paraphrases else [])
        answer = hp.target_prefix + r.target_true
        per_prompt = [coarse_neurons(attribution_scores(lm, p, answer, hp, backend), hp.adaptive_threshold)
                      for p in prompts]
        neurons = refined_neurons(per_prompt, hp.p, hp.refine)
        trace["attribution_s"] = trace.get("attribution_s", 0.0) + time.perf_counter() - t0
        target_ids = list(lm.tokenizer.encode(hp.target_prefix + r.target_new))
        greedy = greedy_tokens(lm, prompt, len(target_ids))
        E = lm.model.get_submodule(lm.adapter.embed).weight
        delta = hp.lr_scale * edit_vector(E, target_ids, greedy)
        ups = neuron_updates(lm, hp.layers, neurons, delta)
        trace.setdefault("neurons", []).append([(hp.layers[row], i) for row, i in neurons])
        trace.setdefault("coarse", []).append(sum(len(n) for n in per_prompt))
        return ups


METHOD = KN()
