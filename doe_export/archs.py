"""Where each architecture family keeps its transformer layers, FFN and attention.

The rest of the toolchain never names a module directly: it asks the :class:`ArchSpec` of the
model for "the up-projection(s) of layer i" or "the down-projection of layer i". Adding a family
means adding one entry to :data:`ARCHS`.

FFN of one layer, H hidden size, I FFN width::

    x [B, T, H] --up--> [B, T, I] --act--> h [B, T, I] --down--> [B, T, H]

``up`` lists every Linear whose *rows* index FFN neurons (BERT: one; Llama: gate and up);
``down`` is the Linear whose *columns* index them. The input of ``down`` is the neuron
activation ``h`` that attribution scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]  # transformers' config.model_type values of this family
    layers: str  # dotted path from the backbone (AutoModel) to the ModuleList of layers
    up: tuple[str, ...]  # dotted paths inside a layer: Linears whose rows are FFN neurons
    down: str  # dotted path inside a layer: Linear whose columns are FFN neurons
    attention: tuple[str, str, str, str]  # q, k, v, out projections inside a layer
    decoder: bool = False  # causal LM backbone: pool the last real token
    # dotted path inside a layer to the module that holds the head count (num_attention_heads /
    # n_heads, all_head_size); None: attention heads of this family cannot be removed (MPNet shares
    # one relative-position bias of all heads across layers; Llama groups key/value heads).
    heads_module: str | None = None

    def attention_linears(self, layer: nn.Module) -> list[nn.Linear]:
        """[q, k, v, out]: rows of q/k/v and columns of out index (head, head_dim)."""
        return [get_module(layer, path) for path in self.attention]

    def head_counts(self, backbone: Any) -> list[int]:
        return [
            self.attention_linears(layer)[3].in_features // self.head_dim(backbone)
            for layer in self.layer_list(backbone)
        ]

    def head_dim(self, backbone: Any) -> int:
        config = backbone.config  # DistilBERT maps hidden_size/num_attention_heads to dim/n_heads
        return config.hidden_size // config.num_attention_heads

    def layer_list(self, backbone: Any) -> nn.ModuleList:
        return get_module(backbone, self.layers)

    def up_linears(self, layer: nn.Module) -> list[nn.Linear]:
        return [get_module(layer, path) for path in self.up]

    def down_linear(self, layer: nn.Module) -> nn.Linear:
        return get_module(layer, self.down)

    def ffn_widths(self, backbone: Any) -> list[int]:
        return [self.down_linear(layer).in_features for layer in self.layer_list(backbone)]


_BERT_ATTN = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")


def _bert_like(family: str, model_types: tuple[str, ...]) -> ArchSpec:
    """BERT's layout: encoder.layer[i] with intermediate/output dense FFN and self-attention."""
    return ArchSpec(
        family,
        model_types,
        "encoder.layer",
        ("intermediate.dense",),
        "output.dense",
        _BERT_ATTN,
        heads_module="attention.self",
    )


ARCHS: dict[str, ArchSpec] = {
    spec.family: spec
    for spec in (
        _bert_like("bert", ("bert",)),
        _bert_like("roberta", ("roberta", "xlm-roberta", "camembert")),
        _bert_like("electra", ("electra",)),
        ArchSpec(
            "distilbert",
            ("distilbert",),
            "transformer.layer",
            ("ffn.lin1",),
            "ffn.lin2",
            ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"),
            heads_module="attention",
        ),
        ArchSpec(
            "mpnet",
            ("mpnet",),
            "encoder.layer",
            ("intermediate.dense",),
            "output.dense",
            ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o"),
        ),
        ArchSpec(
            "llama",
            ("llama", "mistral", "qwen2"),
            "layers",
            ("mlp.gate_proj", "mlp.up_proj"),
            "mlp.down_proj",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
            decoder=True,
        ),
    )
}


def supported_model_types() -> list[str]:
    return sorted(t for spec in ARCHS.values() for t in spec.model_types)


def arch_for(config) -> ArchSpec:
    """The spec for a transformers config, or an error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    for spec in ARCHS.values():
        if model_type in spec.model_types:
            return spec
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported model types: "
        f"{', '.join(supported_model_types())}. Add an ArchSpec to doe_export.archs.ARCHS for a new family."
    )


def get_module(root: nn.Module, path: str) -> Any:
    module: Any = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    setattr(parent, name, new)
