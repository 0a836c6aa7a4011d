"""The gate every variant passes before a bundle ships it: label agreement with the PyTorch expert and
the metric, on the test split (the ONNX run is replaced by given logits: the gate's arithmetic alone)."""

from pathlib import Path

import numpy as np
import pytest

from doe_export import evaluate, variants
from doe_export.specs import ExportSpec


class _Split:
    name = "test split"

    def __init__(self, inputs, labels):
        self.inputs, self.labels = inputs, labels

    def __len__(self):
        return len(self.labels)


def _check(monkeypatch, flips_to_right: int, flips_to_wrong: int, items: int = 200):
    """The expert is right on the even items only; the variant changes some of its labels."""
    labels = [1] * items
    expert = np.array([i % 2 == 0 for i in range(items)], dtype=int)  # label 1 on even items: right there
    variant = expert.copy()
    variant[np.flatnonzero(expert == 0)[:flips_to_right]] = 1
    variant[np.flatnonzero(expert == 1)[:flips_to_wrong]] = 0
    monkeypatch.setattr(evaluate, "onnx_file_logits", lambda *a, **k: np.eye(2)[variant])
    test = _Split(["x"] * items, labels)
    spec = ExportSpec()
    return variants.split_check(
        Path("model.int8.onnx"), None, test, metric="accuracy", expected=np.eye(2)[expert], spec=spec, reference=0.5
    )


def test_variant_gate_reads_agreement_and_metric(monkeypatch):
    floor = ExportSpec().variant_min_agreement
    assert 0.97 < floor < 0.99  # 98 %: benchmarks/results/int8-agreement/README.md says why
    balanced = _check(monkeypatch, 2, 2)  # 4 of 200 labels changed (98 %), accuracy unchanged: shipped
    assert balanced["label_agreement"] == pytest.approx(0.98) and balanced["problems"] == []
    too_many = _check(monkeypatch, 3, 3)  # 97 %: refused on agreement, naming the floor
    assert too_many["problems"] == ["labels agree with the PyTorch expert on 97.00% of 200 test items (needs >= 98%)"]
    worse = _check(monkeypatch, 0, 1)  # 99.5 % agreement but 0.5 points lower: refused on the metric
    assert len(worse["problems"]) == 1 and "accuracy 0.4950 vs the PyTorch expert's 0.5000" in worse["problems"][0]
