"""Locate: token positions of the subject and activations of modules at those positions.

Tokenisation follows the original ROME/MEMIT code exactly (it decides which token is "the
subject's last token"): the template is split at ``{}``; a non-empty prefix loses its trailing
space, which moves onto the word (" " + subject.strip()); prefix, word and suffix are tokenised
separately without special tokens; the index is len(prefix) + len(word) - 1. The model always
sees the whole filled sentence tokenised at once, right-padded.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from editfast.core.errors import RequestError
from editfast.engine.kv import encode, right_pad
from editfast.models.placement import input_device
from editfast.models.trace import LayerRest, SkipBelow, Trace


def subject_last_index(tok, template: str, subject: str) -> int:
    """Index of the subject's last token in ``template`` (with one "{}") filled with ``subject``."""
    if template.count("{}") != 1:
        raise RequestError(f"template {template!r} must contain exactly one '{{}}' for the subject")
    prefix, suffix = template.split("{}")
    word = subject
    if prefix:
        if prefix.endswith(" "):
            prefix, word = prefix[:-1], " " + subject.strip()
    n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    n_word = len(tok(word, add_special_tokens=False)["input_ids"])
    return n_prefix + n_word - 1


def _at_positions(tr: Trace, pos: torch.Tensor, got: dict) -> None:
    """Append each recorded input/output of ``tr`` at one position per row to ``got``."""
    rows = torch.arange(pos.shape[0], device=pos.device)
    for (kind, name), parts in got.items():
        t = (tr.inputs if kind == "in" else tr.outputs)[name]
        parts.append(t[rows.to(t.device), pos.to(t.device)])  # a device map: t on its layer's device


def _collector(inputs, outputs) -> dict[tuple[str, str], list[torch.Tensor]]:
    return {("in", n): [] for n in inputs} | {("out", n): [] for n in outputs}


@torch.no_grad()
def activations_at(lm, texts: Sequence[str], idxs: Sequence[int], *, inputs=(), outputs=(),
                   batch_size: int = 128) -> dict[tuple[str, str], torch.Tensor]:
    """Inputs/outputs of named modules at one position per text: {("in"|"out", name): [n, d]}.

    The forward stops as soon as all requested modules have fired.
    """
    device = input_device(lm.model)
    got = _collector(inputs, outputs)
    for s in range(0, len(texts), batch_size):
        ids, mask = encode(lm.tokenizer, texts[s: s + batch_size], device)
        with Trace(lm.model, inputs=inputs, outputs=outputs, stop=True) as tr:
            lm.model(input_ids=ids, attention_mask=mask)
        _at_positions(tr, torch.tensor(idxs[s: s + batch_size], device=device), got)
    return {k: torch.cat(v) for k, v in got.items()}


def word_activations(lm, templates: Sequence[str], subjects: Sequence[str], **kw) -> dict:
    """``activations_at`` at the subject's last token of each filled template."""
    return activations_at(lm, *_sentences(lm.tokenizer, templates, subjects), **kw)


def _sentences(tok, templates: Sequence[str], subjects: Sequence[str]) -> tuple[list[str], list[int]]:
    """Each template filled with its subject, and the index of the subject's last token in it."""
    texts = [t.replace("{}", s, 1) for t, s in zip(templates, subjects)]
    return texts, [subject_last_index(tok, t, s) for t, s in zip(templates, subjects)]


class LayerwiseReader:
    """``word_activations`` for a model edited one layer at a time, bottom-up (MEMIT's loop).

    Layers below the one edited last have not changed, so each pass starts from the hidden states
    that the previous pass recorded at that layer's input; and every text is cut after its
    subject's last token, the only position read (the model is causal: later tokens cannot
    change it). Same activations as fresh full forwards, a fraction of the layers and tokens.
    """

    def __init__(self, lm, templates: Sequence[str], subjects: Sequence[str], batch_size: int = 128):
        self.lm = lm
        tok = lm.tokenizer
        texts, idxs = _sentences(tok, templates, subjects)
        self.device = input_device(lm.model)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        cut = [tok(t, add_special_tokens=False)["input_ids"][: i + 1] for t, i in zip(texts, idxs)]
        self.batches = []
        for s in range(0, len(cut), batch_size):
            ids, mask = right_pad(cut[s: s + batch_size], pad, self.device)
            self.batches.append((ids, mask, torch.tensor(idxs[s: s + batch_size], device=self.device)))
        self.start, self.hidden = 0, [None] * len(self.batches)
        self.rest: LayerRest | None = None  # what the layers return beside the hidden states

    @torch.no_grad()
    def read(self, record_layer: int, *, inputs=(), outputs=()) -> dict[tuple[str, str], torch.Tensor]:
        """Activations at the read positions on the model as it is now, which may differ from the
        previous pass's only at layers ≥ the previous ``record_layer``; this pass records the
        input of ``record_layer`` (the next pass starts there)."""
        if record_layer < self.start:
            raise ValueError(f"layers must go up: recorded layer {self.start}, asked {record_layer}")
        adapter, model = self.lm.adapter, self.lm.model
        here = adapter.layer_tmp.format(record_layer)
        got = _collector(inputs, outputs)
        for b, (ids, mask, pos) in enumerate(self.batches):
            # the layers' output structure (for SkipBelow), seen once on a full forward
            learn = self.rest is None and record_layer > 0
            with (LayerRest(model.get_submodule(adapter.layer_tmp.format(record_layer - 1))) if learn
                  else nullcontext()) as layer_rest, Trace(model, inputs=[here, *inputs], outputs=outputs, stop=True) as tr:
                if self.start == 0:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                else:
                    with SkipBelow(model, adapter, self.start - 1, self.rest.rest) as skip:
                        skip.h = self.hidden[b]
                        model(input_ids=ids, attention_mask=mask, use_cache=False)
            if learn:
                self.rest = layer_rest
            self.hidden[b] = tr.inputs[here]
            _at_positions(tr, pos, got)
        self.start = record_layer
        return {k: torch.cat(v) for k, v in got.items()}
