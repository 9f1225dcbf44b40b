"""The table of model families: for each, the module names of its decoder layers, MLP input and
output projections, final norm and head, and the weight orientation (GPT-2's Conv1D stores
``[in, out]``, ``nn.Linear`` ``[out, in]``). The only place that names a family's modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    """Module names and weight layout of one architecture family. Templates take the layer index."""

    family: str
    model_types: tuple[str, ...]  # HF config.model_type values served
    layer_tmp: str  # decoder block
    mlp_tmp: str  # whole MLP block (its output is the rewrite module's output)
    rewrite_tmp: str  # MLP output projection: the weight that ROME/MEMIT edit
    attn_tmp: str  # attention block
    final_norm: str
    embed: str  # input embedding
    lm_head: str  # output embedding (may be tied to `embed`)
    weight_in_out: bool  # rewrite weight stored [in=d_mlp, out=d_model] (GPT-2 Conv1D), else [out, in]
    n_layers_attr: str  # config attribute holding the layer count
    # the MLP's input projection (its output: the pre-activation; for gated MLPs the gate), which
    # knowledge-neuron attribution patches (EasyEdit's `input_ff_attr`)
    mlp_in_tmp: str = ""
    # a norm applied to the MLP's output before the residual add (Gemma-2's and OLMo-2's
    # post_feedforward_layernorm), "" for none. Where there is one, the MLP output (ROME's value
    # space) is not the residual stream's delta: ROME's target is optimised at the MLP output
    # itself (exact); a residual-stream target (MEMIT's, at the last edited layer's output) is
    # mapped through the norm layer by layer (`methods.locate_then_edit.base.post_norm_targets`; docs/models.md)
    mlp_out_norm: str = ""

    def name(self, tmp: str, layer: int | None = None) -> str:
        """Fill a template (e.g. `self.rewrite_tmp`) with a layer index."""
        return tmp.format(layer) if layer is not None else tmp

    def module(self, model: nn.Module, tmp_or_name: str, layer: int | None = None) -> nn.Module:
        return model.get_submodule(self.name(tmp_or_name, layer))

    def rewrite_weight(self, model: nn.Module, layer: int) -> nn.Parameter:
        return self.module(model, self.rewrite_tmp, layer).weight

    def num_layers(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.n_layers_attr))

    def d_model(self, model: nn.Module) -> int:
        shape = self.rewrite_weight(model, 0).shape
        return shape[1] if self.weight_in_out else shape[0]

    def d_mlp(self, model: nn.Module) -> int:
        shape = self.rewrite_weight(model, 0).shape
        return shape[0] if self.weight_in_out else shape[1]

    def to_weight_layout(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """A [d_model, d_mlp] ("out, in") matrix in the rewrite weight's own layout.
        Transposing is its own inverse, so this also maps the weight layout back to [out, in]."""
        return delta_out_in.T if self.weight_in_out else delta_out_in


ADAPTERS: dict[str, Adapter] = {a.family: a for a in [
    Adapter("gpt2", ("gpt2",), "transformer.h.{}", "transformer.h.{}.mlp",
            "transformer.h.{}.mlp.c_proj", "transformer.h.{}.attn", "transformer.ln_f",
            "transformer.wte", "lm_head", weight_in_out=True, n_layers_attr="n_layer",
            mlp_in_tmp="transformer.h.{}.mlp.c_fc"),
    Adapter("gptj", ("gptj",), "transformer.h.{}", "transformer.h.{}.mlp",
            "transformer.h.{}.mlp.fc_out", "transformer.h.{}.attn", "transformer.ln_f",
            "transformer.wte", "lm_head", weight_in_out=False, n_layers_attr="n_layer",
            mlp_in_tmp="transformer.h.{}.mlp.fc_in"),
    Adapter("gpt_neox", ("gpt_neox",), "gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp",
            "gpt_neox.layers.{}.mlp.dense_4h_to_h", "gpt_neox.layers.{}.attention",
            "gpt_neox.final_layer_norm", "gpt_neox.embed_in", "lm_head", weight_in_out=False,
            n_layers_attr="num_hidden_layers", mlp_in_tmp="gpt_neox.layers.{}.mlp.dense_h_to_4h"),
    Adapter("llama", ("llama", "mistral", "qwen2", "qwen3"), "model.layers.{}", "model.layers.{}.mlp",
            "model.layers.{}.mlp.down_proj", "model.layers.{}.self_attn", "model.norm",
            "model.embed_tokens", "lm_head", weight_in_out=False, n_layers_attr="num_hidden_layers",
            mlp_in_tmp="model.layers.{}.mlp.gate_proj"),
    # Llama's names with a post-MLP norm (see mlp_out_norm)
    *[Adapter(family, (family,), "model.layers.{}", "model.layers.{}.mlp", "model.layers.{}.mlp.down_proj",
              "model.layers.{}.self_attn", "model.norm", "model.embed_tokens", "lm_head", weight_in_out=False,
              n_layers_attr="num_hidden_layers", mlp_in_tmp="model.layers.{}.mlp.gate_proj",
              mlp_out_norm="model.layers.{}.post_feedforward_layernorm") for family in ("gemma2", "olmo2")],
    # fused gate/up projection: no d_mlp-wide MLP input for knowledge neurons (see archs.py)
    Adapter("phi3", ("phi3",), "model.layers.{}", "model.layers.{}.mlp", "model.layers.{}.mlp.down_proj",
            "model.layers.{}.self_attn", "model.norm", "model.embed_tokens", "lm_head", weight_in_out=False,
            n_layers_attr="num_hidden_layers"),
]}


_BY_MODEL_TYPE = {mt: a for a in ADAPTERS.values() for mt in a.model_types}


def supported_architectures() -> list[str]:
    """The HF `config.model_type` values that have an adapter in the table (others are found by
    structure, see `editfast.models.archs`)."""
    return sorted(_BY_MODEL_TYPE)


def model_has_lm_head(model: nn.Module) -> bool:
    return model.get_output_embeddings() is not None
