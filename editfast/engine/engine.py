"""One batched inference engine for every task: scoring and greedy generation.

Scoring (log-likelihood of continuations, rolling perplexity windows):
- requests are tokenised like lm-evaluation-harness (the context's trailing spaces move to the
  continuation; the continuation's ids are cut from the encoding of context + continuation);
- each distinct context runs once, left-padded, and its keys/values are cached; all
  continuations of that context then run against the cache. A label set of single tokens
  therefore costs one forward per example, and multi-token options share their context's
  forward. A context with a single continuation (a perplexity window) runs with it as one
  right-padded causal sequence, with no attention mask;
- continuation log-probabilities come from the fused kernel (``editfast.kernels.logprob``):
  hidden states × LM head → log-sum-exp and gather, chunked over the vocabulary, never
  materialising [B, T, V] fp32 logits;
- contexts are sorted by length and batched by a token budget across all tasks, each batch's
  contexts at least ``SIMILAR`` of its longest.

Generation: batched greedy decoding (or top-k sampling, ``Sample``) with a KV cache, left padding,
per-request stop strings and max_new_tokens; prompts are sorted by length (bucketed across tasks).
Continuous batching: finished sequences leave the batch at once and waiting prompts are prefilled
and join the running batch (their caches stacked right-aligned), so one long answer does not hold
a whole batch back. The cache writes into preallocated buffers (``locate.kv_cache(room=...)``)
instead of concatenating at every step; prompts of unlike lengths are prefilled apart and their caches
stacked, so one long prompt does not pad the others. Prompts that open with the same tokens (a
task's few-shot exemplars or instruction) share them: the common prefix runs once and only each
prompt's own suffix is prefilled; every row then attends to the prefix's single copy of
keys/values through cascade attention (``cascade.py``), or, for models without transformers'
attention interface, the prefix's keys/values seed each row's cache. A sampled request draws its
uniform numbers from a generator seeded by its own ``seed`` (one number per new token), and the
token at each step is the inverse of the top-k distribution's CDF at that number: its text does
not depend on the batch it runs in, nor on the order of the requests.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import nullcontext
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from editfast.core.compat import cache_kwargs, output_cache
from editfast.core.errors import ModelError
from editfast.engine import cascade
from editfast.engine.kv import growing, kv_cache, left_pad, right_pad
from editfast.engine.requests import (
    Generate,
    LogLik,
    LogLikResult,
    Output,
    Request,
    Rolling,
    RollingResult,
    Sample,
)
from editfast.kernels.logprob import token_logprobs
from editfast.models import routing
from editfast.models.archs import logit_softcap
from editfast.models.placement import input_device, resident_weight

CPU_BATCH_TOKENS = 4096  # scoring; generation with continuous batching does best at twice this
SHARE_MIN_TOKENS = 32  # a common prompt prefix at least this long is computed once per group
SIMILAR = 0.75  # a batch's rows are at least this fraction of its longest (left padding wastes <= 1/4)


def stop_index(text: str, stops: Sequence[str]) -> int | None:
    """Where ``text`` ends at its first stop string, searched after the leading whitespace (a model
    that opens with "\n\n" has not finished when the stop string is "\n\n")."""
    start = len(text) - len(text.lstrip())
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def prefix_groups(prompts: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
    """Partition prompt indices into (shared prefix length, members): prompts that open with the
    same ``SHARE_MIN_TOKENS`` tokens form a group sharing their longest common prefix (at least
    one own token is left to every prompt); the rest form one group sharing nothing."""
    by_head: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_head[tuple(p[:SHARE_MIN_TOKENS]) if len(p) > SHARE_MIN_TOKENS else ()].append(i)
    groups, lone = [], by_head.pop((), [])
    for members in by_head.values():
        if len(members) < 2:
            lone += members
            continue
        first, n = prompts[members[0]], min(len(prompts[i]) for i in members) - 1
        for i in members[1:]:
            p = prompts[i]
            n = next((j for j in range(SHARE_MIN_TOKENS, n) if p[j] != first[j]), n)
        groups.append((n, members))
    if lone:
        groups.append((0, sorted(lone)))
    return groups


class Engine:
    """Answer evaluation requests for one loaded model (``editfast.load_model``)."""

    def __init__(self, lm, batch_tokens: int | str = "auto", max_length: int | None = None, progress: bool = True,
                 cascade_attention: bool = True, continuous_batching: bool = True):
        """``cascade_attention``: rows sharing a prompt prefix attend to one copy of it (where the
        model supports it); False gives every row its own copy. ``continuous_batching``: waiting
        prompts join a running generation batch; False runs batch after batch. Both switches
        exist for the benchmark's comparisons."""
        self.lm, self.model, self.tok = lm, lm.model, lm.tokenizer
        self.cascade = cascade_attention and cascade.supported(self.model)
        self.continuous = continuous_batching
        self.head = self.model.get_output_embeddings()
        self.softcap = logit_softcap(self.model.config)  # Gemma-2's final soft cap, applied in the kernel
        if self.head is None:

            raise ModelError(f"model {lm.spec!r} has no LM head; evaluation needs a causal LM")
        self.device = input_device(self.model)
        cfg = self.model.config
        self.max_length = max_length or min(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048, 2048)
        self.batch_tokens = self._auto_batch_tokens() if batch_tokens == "auto" else int(batch_tokens)
        # CPU, measured (SmolLM2-135M, 2 cores, 48-64 prompts of GSM8K, SAMSum, CoNLL-03, NQ):
        # 8,192 tokens beat 4,096 by 1-11% and 16,384 was slower
        self.gen_tokens = 2 * self.batch_tokens if batch_tokens == "auto" and self.device.type != "cuda" \
            else self.batch_tokens
        self.progress = progress
        # the token before an empty context and the first perplexity window: lm-evaluation-harness's
        # choice (BOS where the tokenizer has one, else EOS)
        self.prefix_id = next((t for t in (self.tok.bos_token_id, self.tok.eos_token_id, self.tok.pad_token_id)
                               if t is not None), 0)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.prefix_id
        self.stats: dict[str, float] = defaultdict(float)
        self.stackable = growing(kv_cache(self.model, room=1))  # caches' rows can be stacked (no sliding window)

    # -- sizing ---------------------------------------------------------------------------------
    def _auto_batch_tokens(self) -> int:
        """CPU: a fixed budget (bigger batches stop paying off on a few cores). CUDA: the largest
        power-of-two token budget whose forward at full length fits, found by trying."""
        if self.device.type != "cuda":
            return CPU_BATCH_TOKENS
        budget = 1 << 20
        while budget > self.max_length:
            try:
                rows = max(1, budget // self.max_length)
                ids = torch.full((rows, self.max_length), self.tok.eos_token_id or 0, device=self.device)
                with torch.no_grad():
                    h = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
                    token_logprobs(h[:, -64:].reshape(-1, h.shape[-1]), self.head.weight,
                                   torch.zeros(rows * 64, dtype=torch.long, device=self.device), softcap=self.softcap)
                del h
                torch.cuda.empty_cache()
                return budget // 2  # headroom for the KV cache and generation
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                budget //= 2
        return self.max_length

    # -- public ---------------------------------------------------------------------------------
    def run(self, requests: Sequence[Request]) -> list[Output]:
        """Answer mixed requests; outputs are aligned with ``requests``."""
        out: list[Output] = [None] * len(requests)  # type: ignore[list-item]
        by_kind: dict[type, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_kind[type(r)].append(i)
        if by_kind[LogLik]:
            for i, res in zip(by_kind[LogLik], self.loglikelihood([requests[i] for i in by_kind[LogLik]])):
                out[i] = res
        if by_kind[Rolling]:
            for i, res in zip(by_kind[Rolling], self.rolling([requests[i] for i in by_kind[Rolling]])):
                out[i] = res
        gen = by_kind[Generate] + by_kind[Sample]
        if gen:
            for i, res in zip(gen, self.generate([requests[i] for i in gen])):
                out[i] = res
        return out

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-evaluation-harness's split: trailing spaces of the context go to the continuation."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tok(context + continuation, add_special_tokens=False)["input_ids"]
        ctx = self.tok(context, add_special_tokens=False)["input_ids"]
        if not ctx:
            ctx = [self.prefix_id]
            return ctx, whole
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests: Sequence[LogLik]) -> list[LogLikResult]:
        pairs = [self.encode_pair(r.context, r.continuation) for r in requests]
        return self.score_ids(pairs, desc="loglikelihood")

    def rolling(self, requests: Sequence[Rolling]) -> list[RollingResult]:
        """Every token of each text predicted, as lm-evaluation-harness's rolling windows: windows of
        ``max_length`` predicted tokens whose context is the one token before them (the prefix
        token for the first window); a shorter last window is given as many tokens before it as
        fill the ``max_length`` input (``score_ids`` cuts the context to fit)."""
        L = self.max_length
        pieces, owner = [], []
        for i, r in enumerate(requests):
            toks = self.tok(r.text, add_special_tokens=False)["input_ids"]
            full = [self.prefix_id] + toks
            for s in range(0, len(toks), L):
                pieces.append((full[max(0, s + 1 - L): s + 1], full[s + 1: s + 1 + L]))
                owner.append(i)
        scored = self.score_ids(pieces, desc="perplexity")
        lp, nt = [0.0] * len(requests), [0] * len(requests)
        for i, res in zip(owner, scored):
            lp[i] += res.logprob
            nt[i] += res.n_tokens
        return [RollingResult(lp[i], nt[i], len(r.text.split()), len(r.text.encode("utf-8")))
                for i, r in enumerate(requests)]

    # -- scoring core ---------------------------------------------------------------------------
    @torch.no_grad()
    def score_ids(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "score") -> list[LogLikResult]:
        """Log-likelihood of token continuations given token contexts.

        A context with several continuations runs once, left-padded, and its continuations run
        against its cache. A context with one continuation runs as one sequence, context +
        continuation without its last token, right-padded and without an attention mask: under
        the causal mask nothing attends to padding at the end, and the attention kernel skips the
        masked upper triangle (perplexity windows of 2,048 tokens spent 38% of their time in
        attention with an explicit mask; benchmark row "perplexity window attention")."""
        L = self.max_length
        fixed = []
        for ctx, cont in pairs:
            cont = cont[-L:]  # a continuation longer than the window keeps its end
            keep = max(1, L + 1 - len(cont))  # left-truncate the context so everything fits
            fixed.append((tuple(ctx[-keep:]), tuple(cont)))
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (ctx, _) in enumerate(fixed):
            groups[ctx].append(i)
        # a memory routed per sequence (WISE) must see each context with its continuation: no sharing
        whole = routing.sequence_level(self.model)
        alone = sorted((i for c in groups for i in groups[c] if whole or len(groups[c]) == 1),
                       key=lambda i: len(fixed[i][0]) + len(fixed[i][1]), reverse=True)
        shared = [] if whole else sorted((c for c in groups if len(groups[c]) > 1), key=len, reverse=True)
        results: list[LogLikResult] = [None] * len(pairs)  # type: ignore[list-item]
        bar = tqdm(total=len(pairs), desc=desc, unit="req", disable=not self.progress)
        t0 = time.perf_counter()
        widths = [len(fixed[i][0]) + len(fixed[i][1]) - 1 for i in alone]
        for a, b in similar_lengths(widths, widths, self.batch_tokens):
            for i, res in zip(alone[a:b], self._score_alone([fixed[i] for i in alone[a:b]])):
                results[i] = res
            bar.update(b - a)
        # a batch's cost: its contexts' own tokens plus all their continuations
        costs = [len(c) + sum(len(fixed[i][1]) for i in groups[c]) for c in shared]
        for a, b in similar_lengths([len(c) for c in shared], costs, self.batch_tokens):
            for i, res in self._score_batch(shared[a:b], groups, fixed):
                results[i] = res
            bar.update(sum(len(groups[c]) for c in shared[a:b]))
        bar.close()
        self.stats[f"{desc}_s"] += time.perf_counter() - t0
        self.stats[f"{desc}_requests"] += len(pairs)
        return results

    def _score_alone(self, items: list[tuple[tuple, tuple]]) -> list[LogLikResult]:
        """(context, continuation) pairs as right-padded causal sequences, no cache."""
        dev = self.device
        ids, real = right_pad([ctx + cont[:-1] for ctx, cont in items], self.pad_id, dev)
        with routing.tokens(self.model, real):  # a routed model leaves the padding alone
            h = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        rows = torch.tensor([r for r, (_, cont) in enumerate(items) for _ in cont], device=dev)
        cols = torch.tensor([len(ctx) - 1 + j for ctx, cont in items for j in range(len(cont))], device=dev)
        targets = torch.tensor([t for _, cont in items for t in cont], device=dev)
        return self._results(h[rows, cols], targets, rows, [len(cont) for _, cont in items])

    def _score_batch(self, contexts, groups, fixed):
        dev = self.device
        ids, mask, pos = left_pad(contexts, self.pad_id, dev)
        members = [(r, i) for r, c in enumerate(contexts) for i in groups[c]]
        conts = [fixed[i][1] for _, i in members]
        # continuations of more than one token run against their context's cache, in runs of
        # similar length (right padding)
        multi = sorted((j for j, c in enumerate(conts) if len(c) > 1), key=lambda j: len(conts[j]), reverse=True)
        with routing.tokens(self.model, mask):
            out = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=bool(multi))
        h_last = out.last_hidden_state[:, -1]  # predicts each continuation's first token
        rows_h = [h_last[[r for r, _ in members]]]
        rows_t = [torch.tensor([c[0] for c in conts], device=dev)]
        owner = [torch.arange(len(members), device=dev)]
        kv = [(lay.keys, lay.values) for lay in output_cache(out).layers] if multi else []
        for a, b in similar_lengths([len(conts[j]) for j in multi]):
            run = multi[a:b]
            c_ids, c_mask = right_pad([conts[j][:-1] for j in run], self.pad_id, dev)
            cw = c_ids.shape[1]
            ctx_rows = torch.tensor([members[j][0] for j in run], device=dev)
            ctx_len = mask[ctx_rows].sum(1)
            c_pos = ctx_len[:, None] + torch.arange(cw, device=dev)[None]
            with routing.tokens(self.model, c_mask):
                h = self.model.base_model(input_ids=c_ids, attention_mask=torch.cat([mask[ctx_rows], c_mask], 1),
                                          position_ids=c_pos, use_cache=True,
                                          **cache_kwargs(self.model.base_model, kv_cache(self.model, kv, ctx_rows))
                                          ).last_hidden_state
            sel = c_mask.bool()
            rows_h.append(h[sel])
            rows_t.append(torch.tensor([t for j in run for t in conts[j][1:]], device=dev))
            owner.append(torch.tensor([j for j in run for _ in conts[j][1:]], device=dev))
        res = self._results(torch.cat(rows_h), torch.cat(rows_t), torch.cat(owner), [len(c) for c in conts])
        return [(i, r) for (_, i), r in zip(members, res)]

    def _results(self, h: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor,
                 lengths: list[int]) -> list[LogLikResult]:
        """Sum the log-probabilities of ``targets`` given hidden states ``h`` (one row per target)
        per owner; a continuation is greedy when each of its tokens is the argmax."""
        W = resident_weight(self.head)  # a device map: the head's device (its copy if offloaded)
        dev = W.device
        h, targets, owner = h.to(dev), targets.to(dev), owner.to(dev)
        lp, top = token_logprobs(h, W, targets, getattr(self.head, "bias", None), softcap=self.softcap)
        total = torch.zeros(len(lengths), dtype=torch.float64, device=dev).index_add_(0, owner, lp.double())
        misses = torch.zeros(len(lengths), dtype=torch.long, device=dev).index_add_(0, owner, (~top.bool()).long())
        return [LogLikResult(total[k].item(), n, not bool(misses[k]), n - int(misses[k]))
                for k, n in enumerate(lengths)]

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: Sequence[Generate | Sample]) -> list[str]:
        """Greedy (``Generate``) or top-k sampled (``Sample``) continuations, aligned with ``requests``."""
        enc = [self.tok(r.prompt, add_special_tokens=False)["input_ids"] or [self.prefix_id] for r in requests]
        for k, r in enumerate(requests):  # leave room for the generation in the window
            enc[k] = enc[k][-max(1, self.max_length - r.max_new_tokens):]
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate", unit="req", disable=not self.progress)
        t0 = time.perf_counter()
        for n_prefix, members in prefix_groups(enc):
            prefix_kv, shared = None, nullcontext()
            if n_prefix:
                ids = torch.tensor([enc[members[0]][:n_prefix]], device=self.device)
                past = output_cache(self.model.base_model(input_ids=ids, use_cache=True))
                prefix_kv = [(lay.keys, lay.values) for lay in past.layers]
                if self.cascade:  # attended once per step by every row; else it seeds each row's cache
                    shared, prefix_kv = cascade.shared_prefix(self.model, prefix_kv), None
            order = sorted(members, key=lambda i: len(enc[i]), reverse=True)
            # CPU: rows x (own + new tokens) within the budget (the prefix's attention is cheap);
            # CUDA: the prefix counts per row too (untuned; it bounds the rows' prefix copies, or
            # with cascade attention the prefill's [rows, heads, own, prefix] scores)
            held = n_prefix if self.device.type == "cuda" else 0
            with shared:
                for k, text in self._stream([enc[i][n_prefix:] for i in order], [requests[i] for i in order],
                                            prefix_kv, n_prefix, held):
                    out[order[k]] = text
                    bar.update(1)
        bar.close()
        self.stats["generate_s"] += time.perf_counter() - t0
        self.stats["generate_requests"] += len(requests)
        return out

    def _stream(self, prompts: list[list[int]], reqs: list[Generate | Sample], prefix_kv=None, n_prefix: int = 0,
                held: int = 0) -> Iterator[tuple[int, str]]:
        """Greedy or sampled continuations of ``prompts`` (longest first), yielded as ``(index, text)``
        when each finishes. Continuous batching: a finished row leaves the batch at once, and waiting prompts
        are prefilled and join the running batch while rows x (own + held + new tokens) fits the
        token budget, so a long answer does not hold the rest of its batch back.

        ``prefix_kv``: every row's cache starts from these keys/values (per-row copies);
        ``n_prefix``: positions start after a prefix of that length (held by cascade attention, or
        by ``prefix_kv``)."""
        dev, eos = self.device, self.tok.eos_token_id
        need = [len(p) + held + r.max_new_tokens for p, r in zip(prompts, reqs)]
        room = max(r.max_new_tokens for r in reqs)  # a stacked cache's room for new tokens
        gen: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)
        noise = {i: sample_noise(r) for i, r in enumerate(reqs) if isinstance(r, Sample)}
        rows: list[int] = []  # batch row -> prompt index
        cache = mask = h = next_pos = None
        waiting = 0  # prompts[waiting:] have not started
        while waiting < len(prompts) or rows:
            k, longest = 0, max((need[i] for i in rows), default=0)
            while waiting + k < len(prompts):
                wider = max(longest, need[waiting + k])
                if (rows or k) and (len(rows) + k + 1) * wider > self.gen_tokens:
                    break
                k, longest = k + 1, wider
            # join when a quarter of the batch is free (each join copies the batch's cache once),
            # or for the last prompts; a cache whose layers cannot be stacked runs batch by batch
            if k and (not rows or (self.continuous and self.stackable
                                   and (4 * k >= len(rows) + k or waiting + k == len(prompts)))):
                new = list(range(waiting, waiting + k))
                waiting += k
                c, m, hn, pn = self._prefill([prompts[i] for i in new], [reqs[i] for i in new], prefix_kv, n_prefix)
                if rows:
                    cache, mask = self._stack([(cache, mask), (c, m)], room)
                    self.stats["generate_joins"] += 1
                    h, next_pos = torch.cat([h, hn]), torch.cat([next_pos, pn])
                else:
                    cache, mask, h, next_pos = c, m, hn, pn
                rows += new
            nxt = self._next_tokens(h, rows, reqs, noise, gen)
            keep = []
            for b, i in enumerate(rows):
                t = int(nxt[b])
                done = t == eos and i not in noise  # a sample runs to its length
                if not done:
                    gen[i].append(t)
                    done = len(gen[i]) >= reqs[i].max_new_tokens
                    if reqs[i].stop and not done:  # decoded at every step only where a stop string can end it
                        texts[i] = self.tok.decode(gen[i], skip_special_tokens=True)
                        done = stop_index(texts[i], reqs[i].stop) is not None
                if done:
                    texts[i] = self.tok.decode(gen[i], skip_special_tokens=True)
                    yield i, texts[i][: stop_index(texts[i], reqs[i].stop)]
                else:
                    keep.append(b)
            if len(keep) < len(rows):  # finished sequences leave the batch
                rows = [rows[b] for b in keep]
                if not rows:
                    cache = None
                    continue
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, nxt, next_pos = mask[sel], nxt[sel], next_pos[sel]
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=dev)], 1)
            out = self.model.base_model(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                        use_cache=True, **cache_kwargs(self.model.base_model, cache))
            cache, h = output_cache(out), out.last_hidden_state[:, -1]
            next_pos = next_pos + 1

    def _next_tokens(self, h: torch.Tensor, rows: list[int], reqs: list[Generate | Sample],
                     noise: dict[int, torch.Tensor], gen: list[list[int]]) -> torch.Tensor:
        """Each row's next token: the argmax, or for a sampled row the top-k token whose cumulative
        probability (top-k renormalised, in the order of descending probability) first exceeds the
        row's uniform number for this step."""
        logits = self.head(h).float()
        nxt = logits.argmax(-1)
        sampled = [b for b, i in enumerate(rows) if i in noise]
        if not sampled:
            return nxt
        if self.softcap:  # Gemma-2's final soft cap changes the distribution, not the argmax
            logits = self.softcap * torch.tanh(logits / self.softcap)
        for k in {reqs[rows[b]].top_k for b in sampled}:
            sel = [b for b in sampled if reqs[rows[b]].top_k == k]
            top = logits[sel].double().topk(min(k, logits.shape[-1]), dim=-1)
            cdf = top.values.softmax(-1).cumsum(-1)
            u = torch.tensor([float(noise[rows[b]][len(gen[rows[b]])]) for b in sel], dtype=torch.float64,
                             device=cdf.device)
            pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)
            nxt[sel] = top.indices.gather(1, pick)[:, 0].to(nxt.dtype)
        return nxt

    def _prefill(self, prompts: list[list[int]], reqs: list[Generate], prefix_kv, n_prefix: int):
        """Cache, attention mask, last hidden states and next positions of left-padded ``prompts``
        (longest first); with ``prefix_kv`` each row's cache and mask are [prefix | left padding |
        own tokens]. Prompts run in chunks of similar length whose caches are then stacked, so one
        long prompt does not pad the rest to its length (a cache that cannot be stacked runs as one)."""
        chunks = similar_lengths([len(p) for p in prompts]) if self.stackable else [(0, len(prompts))]
        parts = [self._prefill_chunk(prompts[a:b], reqs[a:b], prefix_kv, n_prefix) for a, b in chunks]
        self.stats["prefill_splits"] += len(parts) - 1
        if len(parts) == 1:
            return parts[0]
        cache, mask = self._stack([(c, m) for c, m, _, _ in parts], max(r.max_new_tokens for r in reqs))
        return cache, mask, torch.cat([h for *_, h, _ in parts]), torch.cat([p for *_, p in parts])

    def _prefill_chunk(self, prompts: list[list[int]], reqs: list[Generate], prefix_kv, n_prefix: int):
        dev = self.device
        ids, mask, pos = left_pad(prompts, self.pad_id, dev)
        real = mask
        room = ids.shape[1] + max(r.max_new_tokens for r in reqs)
        if prefix_kv is None:
            cache = kv_cache(self.model, room=room)
        else:
            cache = kv_cache(self.model, prefix_kv, batch=len(prompts), room=n_prefix + room)
            mask = torch.cat([torch.ones(len(prompts), n_prefix, dtype=mask.dtype, device=dev), mask], 1)
        pos = pos + n_prefix  # positions skip the padding
        with routing.tokens(self.model, real):
            out = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                        **cache_kwargs(self.model.base_model, cache))
        return output_cache(out), mask, out.last_hidden_state[:, -1], pos[:, -1] + 1

    @staticmethod
    def _stack(parts: list[tuple], room: int) -> tuple:
        """Stack the rows of the caches in ``parts`` ((cache, attention mask) pairs) into the first
        cache (in place), all right-aligned, with room for ``room`` more positions; columns no row
        attends to any more (the padding of rows that left) are dropped. Returns the stacked cache
        and attention mask."""
        cuts = [int(m.sum(0).nonzero()[0]) for _, m in parts]  # first column some row attends to
        masks = [m[:, cut:] for (_, m), cut in zip(parts, cuts)]
        width = max(m.shape[1] for m in masks)
        cache = parts[0][0]
        for i, layer in enumerate(cache.layers):
            own = [c.layers[i] for c, _ in parts]
            layer.place([lay.keys[..., cut:, :] for lay, cut in zip(own, cuts)],
                        [lay.values[..., cut:, :] for lay, cut in zip(own, cuts)], width, width + room)
        return cache, torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in masks])


def sample_noise(r: Sample) -> torch.Tensor:
    """The uniform numbers of a sampled request, one per new token, from a generator seeded by its seed."""
    if r.top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {r.top_k}")
    g = torch.Generator().manual_seed(int(r.seed) % 2**63)
    return torch.rand(r.max_new_tokens, generator=g, dtype=torch.float64)


def similar_lengths(lengths: Sequence[int], costs: Sequence[int] | None = None,
                    budget: float = float("inf"), keep: float = SIMILAR) -> list[tuple[int, int]]:
    """Cut a list of lengths, longest first, into [start, end) runs in which every length is at
    least ``keep`` of the run's first (left padding wastes at most a quarter of a run) and whose
    ``costs`` sum to at most ``budget`` (a run holds at least one item)."""
    runs, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        cost = costs[i] if costs is not None else 0
        if i > start and (n < keep * lengths[start] or total + cost > budget):
            runs.append((start, i))
            start, total = i, 0
        total += cost
    return runs + [(start, len(lengths))] if lengths else []
