"""The task model: a pretrained backbone + soft prompt + classification head, in one module.

This is also the module that is exported to ONNX, so the graph takes only ``input_ids`` and
``attention_mask`` ([B, T] int64) and returns ``logits`` ([B, K] float32)::

    ids [B, T] --embed--> [B, T, H]
    prompt [P, H] (trainable) prepended        -> [B, P+T, H]
    mask [B, T] -> ones for the prompt + mask  -> [B, P+T]
    backbone(inputs_embeds, mask)              -> [B, P+T, H]
    pool (mean over real positions | CLS | last real token) -> [B, H] -> head -> [B, K]

BERT-style models also need ``token_type_ids`` for text pairs. Rather than adding an input,
the graph derives them from the ids: segment 1 starts after the first ``[SEP]``, which is what
BERT tokenizers produce (a test checks this against the tokenizer).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .archs import ArchSpec, arch_for
from .errors import ConfigError

POOLINGS = ("mean", "cls", "last")


class TaskModel(nn.Module):
    def __init__(
        self,
        backbone: Any,  # a transformers PreTrainedModel (AutoModel): config and embeddings are its own
        num_labels: int,
        *,
        prompt_length: int = 0,
        pooling: str | None = None,
        sep_token_id: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.backbone = backbone
        self.spec: ArchSpec = arch_for(backbone.config)
        config = backbone.config
        hidden = config.hidden_size
        self.pooling = pooling or ("last" if self.spec.decoder else "mean")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        self.prompt_length = int(prompt_length)
        generator = torch.Generator().manual_seed(seed)
        embeddings = backbone.get_input_embeddings().weight
        if self.prompt_length > 0:
            # Initialise the soft prompt from real token embeddings (more stable than noise).
            rows = torch.randint(0, embeddings.shape[0], (self.prompt_length,), generator=generator)
            self.prompt = nn.Parameter(embeddings.detach()[rows].clone())
        else:
            self.register_parameter("prompt", None)
        uses_types = getattr(config, "type_vocab_size", 0) > 1
        self.sep_token_id = sep_token_id if uses_types else None
        self.dropout = nn.Dropout(getattr(config, "hidden_dropout_prob", 0.1) or 0.1)
        self.head = nn.Linear(hidden, num_labels)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * 0.02)
            self.head.bias.zero_()

    @property
    def num_labels(self) -> int:
        return self.head.out_features

    def ffn_widths(self) -> list[int]:
        return self.spec.ffn_widths(self.backbone)

    def full_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] mask of the text -> [B, P+T] mask including the soft prompt."""
        if self.prompt is None:
            return attention_mask
        ones = torch.ones(attention_mask.shape[0], self.prompt_length, dtype=attention_mask.dtype)
        return torch.cat([ones.to(attention_mask.device), attention_mask], dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch = input_ids.shape[0]
        embeds = self.backbone.get_input_embeddings()(input_ids)  # [B, T, H]
        mask = self.full_mask(attention_mask)  # [B, P+T]
        if self.prompt is not None:
            prompt = self.prompt.unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype)
            embeds = torch.cat([prompt, embeds], dim=1)  # [B, P+T, H]
        kwargs = {}
        if self.sep_token_id is not None:
            is_sep = (input_ids == self.sep_token_id).long()
            types = ((torch.cumsum(is_sep, dim=1) - is_sep) > 0).long()  # 1 after the first [SEP]
            if self.prompt is not None:
                types = torch.cat([torch.zeros(batch, self.prompt_length, dtype=torch.long), types], dim=1)
            kwargs["token_type_ids"] = types
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=mask, **kwargs).last_hidden_state
        return self.head(self.dropout(self.pool(hidden, mask)))

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)  # [B, P+T, 1]
            return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        if self.pooling == "cls":
            return hidden[:, self.prompt_length]  # first text token ([CLS])
        last = mask.long().sum(dim=1) - 1  # right padding: index of the last real position
        return hidden[torch.arange(hidden.shape[0]), last]

    def trainable(self, mode: str) -> list[nn.Parameter]:
        """Set requires_grad for an adaptation mode and return the trainable parameters.

        ``prompt``: soft prompt + head (backbone frozen); ``finetune``: everything.
        """
        if mode == "prompt":
            if self.prompt is None:
                raise ConfigError("prompt tuning needs prompt_length > 0")
            for param in self.backbone.parameters():
                param.requires_grad_(False)
            params = [self.prompt, *self.head.parameters()]
        elif mode == "finetune":
            params = list(self.parameters())
        else:
            raise ConfigError(f"adaptation mode must be 'prompt' or 'finetune', got {mode!r}")
        for param in params:
            param.requires_grad_(True)
        return params
