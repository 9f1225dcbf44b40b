"""Context templates: short prefixes that the key and the target are averaged over.

Generated from the model like the original code (top-k 5 sampling after the prompts "The",
"Therefore", "Because", "I", "You"; "{" and "}" removed; ". {}" appended), seeded, or fixed for
reproducibility. A method declares its shape: "groups" (MEMIT: [["{}"], five of 10 tokens]) or "flat"
(ROME: ["{}"] + the lengths/counts of ``context_template_length_params``). For ROME the original
samples from GPT-2's <|endoftext|>; a BOS-free start works on every tokenizer, so editfast
uses the same five starter words for both methods.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from editfast.core.compat import cache_kwargs, output_cache
from editfast.core.errors import EditfastError
from editfast.models.placement import input_device

STARTERS = ["The", "Therefore", "Because", "I", "You"]
# Five fixed prefixes written the way generated ones look (the golden reference set uses these).
FIXED = ["The following is a true statement. {}", "Therefore, it is known. {}", "Because of this, we know. {}",
         "I have read about it. {}", "You may already know this. {}"]


@torch.no_grad()
def sample_prefixes(lm, n_per_starter: int, length: int, seed: int, bar=None) -> list[str]:
    """``n_per_starter`` texts per starter word, ``length`` tokens in all, top-k 5 sampling.
    ``bar`` (a tqdm bar, optional) advances by one per generated token step."""

    model, tok = lm.model, lm.tokenizer
    device = input_device(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for word in STARTERS:
        ids = torch.tensor([tok(word, add_special_tokens=False)["input_ids"]] * n_per_starter, device=device)
        past = None
        step_in = ids
        while ids.shape[1] < length:
            res = model(input_ids=step_in, use_cache=True, **cache_kwargs(model, past))
            past = output_cache(res)
            probs = torch.softmax(res.logits[:, -1].float(), -1)
            top_p, top_i = probs.topk(5, dim=-1)
            pick = torch.multinomial((top_p / top_p.sum(-1, keepdim=True)).cpu(), 1, generator=gen).to(device)
            step_in = top_i.gather(1, pick)
            ids = torch.cat([ids, step_in], 1)
            if bar is not None:
                bar.update(1)
        for row in ids:
            text = tok.decode(row, skip_special_tokens=True)
            out.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return out


SHAPES = ("groups", "flat")


def context_templates(lm, shape: str, hp, seed: int = 0, mode: str = "generated",
                      progress: bool = False) -> list[list[str]]:
    """Template groups of a method's ``shape``, generated from the model with ``seed`` or ``fixed``.

    "groups" (MEMIT): [["{}"], five prefixes of 10 tokens], each group weighted equally in the key
    average; "flat" (ROME): one group, ["{}"] + the prefixes of hp.context_template_length_params.
    """
    if shape not in SHAPES:
        raise EditfastError(f"template shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    if mode == "fixed":
        return [["{}"], list(FIXED)] if shape == "groups" else [["{}", *FIXED]]
    if mode != "generated":
        raise EditfastError(f"context template mode must be 'generated' or 'fixed', got {mode!r}")

    def steps(length: int) -> int:  # generation steps of one sample_prefixes call (one per starter and token)
        return len(STARTERS) * max(0, length - 1)

    params = [[10, 1]] if shape == "groups" else getattr(hp, "context_template_length_params", [[5, 10], [10, 10]])
    with tqdm(total=sum(steps(length) for length, _ in params), unit="step", desc="context templates",
              leave=False, disable=not progress) as bar:
        if shape == "groups":
            return [["{}"], sample_prefixes(lm, 1, 10, seed, bar)]
        flat = ["{}"]
        for i, (length, count) in enumerate(params):
            flat += sample_prefixes(lm, max(1, count // len(STARTERS)), length, seed + i, bar)
        return [flat]
