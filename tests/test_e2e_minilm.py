"""End to end on the real packaged MiniLM and real (packaged) BBC News data, kept small:
build -> export -> reload through the Router -> the labels and metrics the manifest promises."""

import numpy as np
import pytest

from doe_export import evaluate, stages
from doe_export.loading import fast_tokenizer, load_model
from doe_export.pipeline import build_task
from doe_export.specs import AdaptSpec, BuildConfig, DataSpec, ExportSpec, PruneSpec, RecoverySpec
from doe_export.tasks import load_bbc_news
from doe_runtime import Router
from doe_runtime.bundle import read_manifest


@pytest.mark.slow  # the real model: ~20 s; `python -m pytest -m slow` (CI runs it)
def test_minilm_bbc_news_end_to_end(tmp_path):
    loaded = load_model()  # the packaged default, offline
    assert loaded.backbone.config.model_type == "bert" and loaded.backbone.config.intermediate_size == 1536
    assert loaded.weights_sha256 and len(loaded.weights_sha256) == 64
    data = load_bbc_news(seed=0)
    config = BuildConfig(
        out_dir=str(tmp_path),
        data=DataSpec(max_train=48, max_dev=16, max_eval=40, max_length=48),
        adapt=AdaptSpec(epochs=1, batch_size=8),
        prune=PruneSpec(calib_examples=16, batch_size=8),
        recovery=RecoverySpec(epochs=1, batch_size=8),
        export=ExportSpec(fp16=False),
        progress=False,
    )

    result, dense, model = build_task(config, loaded, data, return_models=True)

    manifest = read_manifest(tmp_path / "bbc-news")
    assert manifest.architecture["ffn_widths"] == [512] * 6  # round(1536 * 0.35) = 538, aligned to 64: 512
    assert manifest.base_model["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert manifest.extra_positions == 0 and model.prompt is None  # the default ships no soft prompt
    assert result.params_after < result.params_before and result.test_size == 40
    test = stages.Splits.of(data, config.data).test
    assert sorted(set(test.labels)) == list(range(5))  # the stratified sample keeps every topic
    tokenizer = fast_tokenizer(loaded.hf_tokenizer, 48)
    assert result.expert == evaluate.evaluate_torch(model, tokenizer, test, "accuracy")
    assert result.dense == evaluate.evaluate_torch(dense, tokenizer, test, "accuracy")

    fp32 = Router(tmp_path, device="cpu", precision="fp32")
    fp32_labels = [p.label_id for p in fp32.predict("bbc-news", test.inputs)]
    torch_labels = evaluate.torch_logits(model, tokenizer, test.inputs).argmax(1)
    assert fp32_labels == torch_labels.tolist()
    assert abs(np.mean(np.asarray(fp32_labels) == np.asarray(test.labels)) - result.expert_onnx) < 1e-9

    served = Router(tmp_path, device="cpu")  # the defaults: the validated int8 variant on CPU
    if "int8" in manifest.onnx.variants:
        assert served.info("bbc-news")["precision"] == "int8"
        int8_labels = [p.label_id for p in served.predict("bbc-news", test.inputs)]
        accuracy = float(np.mean(np.asarray(int8_labels) == np.asarray(test.labels)))
        assert abs(accuracy - manifest.onnx.variants["int8"].quality["value"]) < 1e-9
        assert np.mean(np.asarray(int8_labels) == torch_labels) >= ExportSpec().variant_min_agreement
    else:  # left out: the build said why, in the manifest
        assert "int8" in manifest.quality["variants_left_out"]
