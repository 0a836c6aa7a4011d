"""Shared fixtures: tiny random models built from configs (odd sizes), the packaged MiniLM
tokenizer, generated task data, and tiny bundles built through the real pipeline."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray hub call fails in ms instead of retrying
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from doe_export.loading import TINY_BERT as TINY


def tiny_config(family: str):
    """A tiny random config per family; vocab matches the packaged MiniLM tokenizer."""
    from transformers import (
        BertConfig,
        DistilBertConfig,
        ElectraConfig,
        LlamaConfig,
        MPNetConfig,
        RobertaConfig,
        XLMRobertaConfig,
    )

    if family == "bert":
        return BertConfig(**TINY)
    if family == "roberta":
        return RobertaConfig(**TINY, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    if family == "xlm-roberta":
        return XLMRobertaConfig(**TINY, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    if family == "electra":
        return ElectraConfig(**{**TINY, "embedding_size": 24})
    if family == "mpnet":
        return MPNetConfig(**TINY, pad_token_id=0)
    if family == "distilbert":
        return DistilBertConfig(
            vocab_size=30522, dim=24, n_layers=2, n_heads=3, hidden_dim=37, max_position_embeddings=160, pad_token_id=0
        )
    if family == "llama":
        return LlamaConfig(
            vocab_size=30522,
            hidden_size=24,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=3,
            max_position_embeddings=160,
            pad_token_id=0,
        )
    raise KeyError(family)


FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "mpnet", "distilbert", "llama")


@pytest.fixture(scope="session")
def hf_tokenizer():
    from transformers import AutoTokenizer

    from doe_export.loading import packaged_minilm_dir

    return AutoTokenizer.from_pretrained(packaged_minilm_dir())


@pytest.fixture(scope="session")
def _tiny_backbones():
    import torch
    from transformers import AutoModel

    built = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        built[family] = AutoModel.from_config(tiny_config(family)).eval()
    return built


@pytest.fixture
def tiny_backbone(_tiny_backbones):
    """Factory: a fresh deep copy per call (pruning mutates the model)."""
    return lambda family="bert": copy.deepcopy(_tiny_backbones[family])


from doe_export.tasks import synthetic_task  # noqa: E402  (generated data, shared with --quick modes)


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory, _tiny_backbones, hf_tokenizer):
    """Two bundles (single-text and pair task) built by the real pipeline from a tiny BERT."""
    from doe_export.loading import LoadedModel
    from doe_export.pipeline import BuildConfig, build_task
    from doe_export.specs import AdaptSpec, DataSpec, PruneSpec, RecoverySpec

    root = tmp_path_factory.mktemp("bundles")
    config = BuildConfig(
        out_dir=str(root),
        data=DataSpec(max_length=32),
        adapt=AdaptSpec(epochs=1, batch_size=8, lr=5e-3),
        prune=PruneSpec(calib_examples=16, batch_size=8),
        recovery=RecoverySpec(epochs=1, batch_size=8),
        progress=False,
    )
    results = {}
    for name, kind in (("toy-single", "single"), ("toy-pair", "pair")):
        loaded = LoadedModel(copy.deepcopy(_tiny_backbones["bert"]), hf_tokenizer, "tiny-bert", "config", None)
        results[name] = build_task(config, loaded, synthetic_task(name, kind))
    return root, results


@pytest.fixture
def bundles(tiny_bundles, tmp_path):
    """A private copy of the session's pipeline-built bundles, so tests may damage them."""
    import shutil

    root, results = tiny_bundles
    copy = tmp_path / "artifacts"
    shutil.copytree(root, copy)
    return copy, results


def _masked_forward(model, where: str, keep, ids, mask, replace=None):
    """Dense forward with what pruning would remove set to zero (or to ``replace``) instead:
    ``where="ffn"``: FFN neurons (the inputs of each down-projection) outside ``keep[layer]``;
    ``where="heads"``: the context vectors of the heads outside ``keep[layer]`` (the inputs of each
    attention output projection). Pruning is exact when it equals this."""
    import torch

    from doe_export import prune

    handles = []
    for index, layer in enumerate(model.spec.layer_list(model.backbone)):
        linear = model.spec.down_linear(layer) if where == "ffn" else model.spec.attention_linears(layer)[3]
        removed = torch.ones(linear.in_features, dtype=torch.bool)
        kept = keep[index] if where == "ffn" else prune.head_rows(keep[index], model.spec.head_dim(model.backbone))
        removed[kept] = False

        def hook(module, args, removed=removed, index=index):
            value = args[0].clone()
            value[..., removed] = 0.0 if replace is None else replace[index][removed]
            return (value,)

        handles.append(linear.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            return model(ids, mask)
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def masked_forward():
    """``masked_forward(model, "ffn"|"heads", keep, ids, mask, replace=None)``: see _masked_forward."""
    return _masked_forward
