"""Every supported family, on a tiny random config with odd sizes: forward, DoE attribution,
physical pruning, ONNX export and validation against PyTorch."""

import numpy as np
import pytest
import torch

from doe_export import attribution, onnx_export, prune, scorers
from doe_export.archs import UnsupportedModelError, arch_for, supported_model_types
from doe_export.loading import fast_tokenizer
from doe_export.taskmodel import TaskModel
from doe_export.tasks import synthetic_task
from doe_runtime.tokenization import encode_batch

from .conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_family_prunes_and_exports(family, tiny_backbone, hf_tokenizer, tmp_path):
    backbone = tiny_backbone(family)
    model = TaskModel(backbone, num_labels=3, prompt_length=4, sep_token_id=hf_tokenizer.sep_token_id).eval()
    tokenizer = fast_tokenizer(hf_tokenizer, 24)
    data = synthetic_task(kind="pair" if family in ("bert", "llama") else "single")
    assert model.ffn_widths() == [37, 37]
    assert model.pooling == ("last" if family == "llama" else "mean")

    stats = attribution.collect_stats(
        model, attribution.calibration_batches(tokenizer, data.train, 16, 8, 0), progress=False
    )
    scores = scorers.DoEScorer("mean").score(model, stats)
    assert [len(s) for s in scores.importance] == [37, 37]
    assert all(bool((s >= 0).all()) and float(s.sum()) > 0 for s in scores.importance)

    keep = prune.select_neurons(scores.importance, prune.PruneConfig(rate=0.6))
    report = prune.prune_ffn(model, keep)
    assert report["ffn_widths"] == [15, 15]  # round(37 * 0.4)
    assert report["params_after"] < report["params_before"]
    for layer in model.spec.layer_list(model.backbone):
        for up in model.spec.up_linears(layer):
            assert up.out_features == 15
        assert model.spec.down_linear(layer).in_features == 15

    ids, mask = encode_batch(tokenizer, data.test.inputs[:3])
    path = tmp_path / "m.onnx"
    onnx_export.export_onnx(model, path, ids, mask)
    report = onnx_export.validate_onnx(model, path, onnx_export.validation_batches(tokenizer, data.test.inputs))
    assert report["max_abs_diff"] <= 1e-4
    assert report["label_agreement"] == 1.0
    assert report["padded_batch_included"]
    assert len(report["shapes"]) >= 2 and len({tuple(s) for s in report["shapes"]}) >= 2


def test_unsupported_model_lists_supported():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError) as info:
        arch_for(GPT2Config())
    message = str(info.value)
    assert "'gpt2'" in message
    for model_type in ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "llama"):
        assert model_type in message
    assert set(supported_model_types()) >= {"bert", "llama", "mpnet"}


def test_token_types_derived_in_graph_match_tokenizer(hf_tokenizer):
    """The graph derives segment ids from [SEP]; they must equal what the BERT tokenizer emits."""
    pairs = [("a man plays the guitar", "someone makes music"), ("short", "a much longer second sentence here")]
    enc = hf_tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    sep = (ids == hf_tokenizer.sep_token_id).long()
    derived = ((torch.cumsum(sep, 1) - sep) > 0).long() * mask
    assert torch.equal(derived, enc["token_type_ids"] * mask)
    assert int(enc["token_type_ids"].sum()) > 0  # the check is not vacuous


def test_prompt_changes_output_and_is_trainable_alone(tiny_backbone):
    model = TaskModel(tiny_backbone("bert"), num_labels=2, prompt_length=3)
    params = model.trainable("prompt")
    assert {id(p) for p in params} == {id(model.prompt), id(model.head.weight), id(model.head.bias)}
    assert not any(p.requires_grad for p in model.backbone.parameters())
    ids = torch.tensor([[101, 2204, 3185, 102]])
    mask = torch.ones_like(ids)
    before = model.eval()(ids, mask).detach()
    with torch.no_grad():
        model.prompt.add_(torch.randn(model.prompt.shape))  # a constant shift would vanish in LayerNorm
    assert not torch.allclose(before, model(ids, mask))
    np.testing.assert_equal(model.full_mask(mask).shape, (1, 7))


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_ort_fusions_keep_outputs(family, tiny_backbone, hf_tokenizer, tmp_path):
    """The fused graph (fused attention with per-layer widths after pruning) still equals PyTorch."""
    import onnx

    model = TaskModel(tiny_backbone(family), num_labels=2, prompt_length=2).eval()
    tokenizer = fast_tokenizer(hf_tokenizer, 24)
    data = synthetic_task()
    keep = prune.select_neurons([torch.rand(37), torch.rand(37)], prune.PruneConfig(rate=0.5))
    prune.prune_ffn(model, keep)
    ids, mask = encode_batch(tokenizer, data.test.inputs[:2])
    onnx_export.export_onnx(model, tmp_path / "raw.onnx", ids, mask)
    fusions = onnx_export.fuse_for_ort(tmp_path / "raw.onnx", tmp_path / "fused.onnx")
    assert fusions, "no fusion applied"
    ops = {node.op_type for node in onnx.load(str(tmp_path / "fused.onnx")).graph.node}
    assert ops & {"MultiHeadAttention", "Attention", "SkipLayerNormalization", "BiasGelu", "FastGelu"}
    report = onnx_export.validate_onnx(
        model, tmp_path / "fused.onnx", onnx_export.validation_batches(tokenizer, data.test.inputs)
    )
    assert report["max_abs_diff"] <= 1e-4 and report["label_agreement"] == 1.0
