"""End to end on the real packaged MiniLM and real (packaged) BBC News data, kept small:
build -> export -> reload through the Router -> same labels as PyTorch."""

import numpy as np

from doe_export import evaluate
from doe_export.loading import fast_tokenizer, load_model
from doe_export.pipeline import BuildConfig, build_task
from doe_export.tasks import load_bbc_news
from doe_runtime import Router
from doe_runtime.bundle import read_manifest


def test_minilm_bbc_news_end_to_end(tmp_path):
    loaded = load_model()  # the packaged default, offline
    assert loaded.backbone.config.model_type == "bert" and loaded.backbone.config.intermediate_size == 1536
    assert loaded.weights_sha256 and len(loaded.weights_sha256) == 64
    data = load_bbc_news(seed=0)
    config = BuildConfig(out_dir=str(tmp_path), epochs=1, recovery_epochs=1, max_train=48, max_dev=16, max_eval=40,
                         calib_examples=16, max_length=48, prompt_length=8, batch_size=8, progress=False)

    result, model = build_task(config, loaded, data, return_model=True)

    manifest = read_manifest(tmp_path / "bbc-news")
    assert manifest["architecture"]["ffn_widths"] == [538] * 6  # round(1536 * 0.35)
    assert manifest["base_model"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert result.params_after < result.params_before
    assert 0.0 <= result.expert <= 1.0 and result.test_size == 40

    texts = data.test.inputs[:40]
    router = Router(tmp_path, device="cpu", batch_size=8)
    runtime_labels = [p.label_id for p in router.predict("bbc-news", texts)]
    torch_labels = evaluate.torch_logits(model, fast_tokenizer(loaded.hf_tokenizer, 48), texts).argmax(1)
    assert runtime_labels == torch_labels.tolist()
    agreement = np.mean(np.asarray(runtime_labels) == np.asarray(data.test.labels[:40]))
    assert abs(agreement - result.expert_onnx) < 1e-9  # the manifest's ORT metric is what the router gives
