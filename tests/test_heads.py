"""Attention-head removal: exact (equals zeroing the heads' context vectors), exported graphs
(plain and fused, per-layer head counts) equal PyTorch, DoE head scores equal a hand computation,
and families whose heads cannot be removed say so."""

import pytest
import torch

from doe_export import attribution, onnx_export, prune, scorers
from doe_export.loading import fast_tokenizer
from doe_export.taskmodel import TaskModel
from doe_export.tasks import synthetic_task
from doe_runtime.tokenization import encode_batch

HEAD_DIM = 8  # tiny configs: hidden 24, 3 heads


def _model(tiny_backbone, family="bert", prompt=3):
    torch.manual_seed(1)
    return TaskModel(tiny_backbone(family), num_labels=2, prompt_length=prompt).eval()


IDS = torch.tensor([[101, 2204, 3185, 2003, 102, 0], [101, 6659, 102, 0, 0, 0]])


@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "distilbert"])
def test_head_removal_equals_masking_and_exports(family, tiny_backbone, hf_tokenizer, tmp_path, masked_forward):
    model = _model(tiny_backbone, family)
    mask = (IDS != 0).long()
    keep = [torch.tensor([0, 2]), torch.tensor([1])]  # per-layer head counts differ
    expected = masked_forward(model, "heads", keep, IDS, mask)
    dense = model(IDS, mask).detach()
    report = prune.prune_heads(model, keep)
    assert report["head_counts_before"] == [3, 3] and report["head_counts"] == [2, 1]
    assert report["params_after"] < report["params_before"]
    with torch.no_grad():
        got = model(IDS, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dense, got, atol=1e-4)

    tokenizer = fast_tokenizer(hf_tokenizer, 24)
    data = synthetic_task()
    ids, mask = encode_batch(tokenizer, data.test.inputs[:2])
    onnx_export.export_onnx(model, tmp_path / "raw.onnx", ids, mask)
    batches = onnx_export.validation_batches(tokenizer, data.test.inputs)
    plain = onnx_export.validate_onnx(model, tmp_path / "raw.onnx", batches)
    assert plain["max_abs_diff"] <= 1e-4 and plain["label_agreement"] == 1.0
    onnx_export.fuse_for_ort(tmp_path / "raw.onnx", tmp_path / "fused.onnx")
    fused = onnx_export.validate_onnx(model, tmp_path / "fused.onnx", batches)
    assert fused["max_abs_diff"] <= 1e-4 and fused["label_agreement"] == 1.0


def test_both_layer_types_with_selection(tiny_backbone):
    model = _model(tiny_backbone)
    generator = torch.Generator().manual_seed(0)
    ffn = [torch.rand(37, generator=generator) for _ in range(2)]
    heads = [torch.tensor([0.1, 0.9, 0.5]), torch.tensor([0.7, 0.2, 0.3])]
    report = prune.prune_model(model, "both", prune.PruneConfig(rate=0.5), ffn, head_importance=heads, head_rate=0.6)
    assert report["ffn_widths"] == [18, 18]  # round(37 * 0.5) = 18 (banker's rounding of 18.5)
    assert report["head_counts"] == [1, 1]  # round(3 * 0.4) = 1: the best head of each layer
    q = model.spec.attention_linears(model.spec.layer_list(model.backbone)[0])[0]
    assert q.out_features == HEAD_DIM
    with pytest.raises(ValueError, match="layer types must be one of"):
        prune.prune_model(model, "heads", prune.PruneConfig(), ffn)


def test_every_head_removed_is_refused(tiny_backbone):
    model = _model(tiny_backbone)
    with pytest.raises(ValueError, match=r"layer 1: keep must name 1\.\.3 heads"):
        prune.prune_heads(model, [torch.tensor([0]), torch.tensor([], dtype=torch.long)])
    # the selection itself never empties a layer, even at rate 0.99
    keep = prune.select_neurons([torch.rand(3), torch.rand(3)], prune.PruneConfig(rate=0.99))
    assert [len(k) for k in keep] == [1, 1]


@pytest.mark.parametrize("family", ["mpnet", "llama"])
def test_families_without_head_removal_say_so(family, tiny_backbone):
    model = _model(tiny_backbone, family)
    with pytest.raises(ValueError, match=r"cannot be removed.*ffn"):
        prune.prune_heads(model, [torch.tensor([0]), torch.tensor([0])])
    with pytest.raises(ValueError, match="cannot be scored or removed"):
        scorers.make_scorer("random").score_heads(model, None)


def test_doe_head_score_matches_hand_computation(tiny_backbone, hf_tokenizer):
    """Head score = |mean_examples(mean_tokens(sum_d c_d * dlogp(gold)/dc_d))| = |dF/dgate| at gate 1."""
    model = _model(tiny_backbone)
    tokenizer = fast_tokenizer(hf_tokenizer, 24)
    data = synthetic_task()
    batches = list(attribution.calibration_batches(tokenizer, data.train, 6, 3, 0))
    stats = attribution.collect_stats(model, iter(batches), progress=False)
    got = scorers.make_scorer("doe").score_heads(model, stats)

    # by hand: a gate per head multiplying its context vector; d logp / d gate, per example per token
    layers = model.spec.layer_list(model.backbone)
    total = [torch.zeros(3, dtype=torch.float64) for _ in layers]
    for ids, mask, labels in batches:
        gates = [torch.ones(ids.shape[0], ids.shape[1] + 3, 3, dtype=torch.float32, requires_grad=True) for _ in layers]
        handles = []
        for index, layer in enumerate(layers):

            def hook(module, args, gate=gates[index]):
                ctx = args[0]
                b, t, _ = ctx.shape
                return ((ctx.reshape(b, t, 3, HEAD_DIM) * gate[..., None]).reshape(b, t, -1),)

            handles.append(model.spec.attention_linears(layer)[3].register_forward_pre_hook(hook))
        logp = torch.log_softmax(model(ids, mask), -1).gather(1, labels[:, None]).sum()
        grads = torch.autograd.grad(logp, gates)
        for handle in handles:
            handle.remove()
        full = model.full_mask(mask).double()
        for index, grad in enumerate(grads):
            per_example = (grad.double() * full[..., None]).sum(1) / full.sum(1, keepdim=True)
            total[index] += per_example.sum(0)
    expected = [(t / 6).abs().float() for t in total]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert all(float(g.sum()) > 0 for g in got)


def test_random_head_scores_seeded(tiny_backbone):
    model = _model(tiny_backbone)
    a = scorers.make_scorer("random", seed=1).score_heads(model, None)
    b = scorers.make_scorer("random", seed=1).score_heads(model, None)
    c = scorers.make_scorer("random", seed=2).score_heads(model, None)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))
    with pytest.raises(ValueError, match="FFN neurons only"):
        scorers.make_scorer("taylor").head_importance(model, None)


def test_build_with_both_layer_types_writes_head_counts(tiny_backbone, hf_tokenizer, tmp_path):
    from doe_export.loading import LoadedModel
    from doe_export.pipeline import build_task
    from doe_export.specs import AdaptSpec, BuildConfig, DataSpec, ExportSpec, PruneSpec, RecoverySpec
    from doe_runtime import Router

    config = BuildConfig(
        out_dir=str(tmp_path),
        data=DataSpec(max_length=32),
        adapt=AdaptSpec(epochs=1, batch_size=8, lr=5e-2),
        prune=PruneSpec(calib_examples=16, batch_size=8, layer_types="both", head_rate=0.34),
        recovery=RecoverySpec(epochs=1, batch_size=8),
        export=ExportSpec(fuse=True),
        progress=False,
    )
    loaded = LoadedModel(tiny_backbone("bert"), hf_tokenizer, "tiny-bert", "config", None)
    result, _, model = build_task(config, loaded, synthetic_task("toy"), return_models=True)
    assert result.head_counts == [2, 2] and result.max_abs_diff <= 1e-4
    router = Router(tmp_path, precision="fp32")
    manifest = router.manifest("toy")
    assert manifest.architecture["num_heads"] == [2, 2]
    assert manifest.architecture["num_heads_dense"] == [3, 3]
    assert manifest.pruning["layer_types"] == ["ffn", "attention"] and manifest.pruning["head_rate"] == 0.34
    texts = ["good film", "bad film", "a dull story with a great cast"]
    from doe_export.evaluate import torch_logits
    from doe_export.loading import fast_tokenizer

    expected = torch_logits(model, fast_tokenizer(hf_tokenizer, 32), texts).argmax(1).tolist()
    assert [p.label_id for p in router.predict("toy", texts)] == expected

    mpnet = LoadedModel(tiny_backbone("mpnet"), hf_tokenizer, "tiny-mpnet", "config", None)
    with pytest.raises(ValueError, match="attention heads of model type 'mpnet' cannot be removed"):
        build_task(
            BuildConfig(out_dir=str(tmp_path), prune=PruneSpec(layer_types="attention", calib_examples=16)),
            mpnet,
            synthetic_task("toy"),
        )
    with pytest.raises(ValueError, match="cannot score attention heads"):
        PruneSpec(layer_types="both", scorer="taylor")
