"""The bundle contract on the reader's side: the typed Manifest, refusals naming the field, paths
that may not leave the bundle, discovery, and the one summary shared by CLI and server."""

import json

import pytest

from doe_runtime import BundleError, Manifest, Router, read_manifest, verify_files
from doe_runtime.bundle import discover


def test_manifest_is_typed_and_round_trips(bundles):
    manifest = read_manifest(bundles / "toy-pair")
    assert isinstance(manifest, Manifest)
    assert manifest.task.name == "toy-pair" and manifest.task.pair
    assert manifest.task.labels == ("entailment", "neutral", "contradiction")
    assert manifest.onnx.input_names == ["input_ids", "attention_mask"] and manifest.onnx.output_names == ["logits"]
    assert sorted(manifest.onnx.variants) == ["fp16", "int8"]
    assert manifest.onnx.variants["int8"].file == "model.int8.onnx"
    assert manifest.tokenizer.max_length == 16 and manifest.tokenizer.pad_id == 0
    document = json.loads((bundles / "toy-pair" / "manifest.json").read_text())
    assert manifest.to_json() == document
    assert Manifest.from_json(manifest.to_json(), "copy") == manifest
    assert [p.name for p in verify_files(bundles / "toy-pair", manifest)] == [
        "model.onnx",
        "tokenizer.json",
        "model.fp16.onnx",
        "model.int8.onnx",
    ]


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda m: m.update(schema_version=99), r"unknown schema_version 99.*reads schema versions \[1\]"),
        (lambda m: m.update(schema_version=True), r"unknown schema_version True"),
        (lambda m: m.pop("task"), r"missing field 'task'"),
        (lambda m: m["task"].update(labels=[]), r"field 'task.labels' must be a non-empty list of strings"),
        (lambda m: m["task"].update(labels=["a", "a", "b"]), r"'task.labels' has duplicates"),
        (lambda m: m["task"].update(input="triple"), r"'task.input' must be one of \['single', 'pair'\]"),
        (lambda m: m["onnx"].update(sha256="abc"), r"onnx.sha256 must be 64 lower-case hex digits"),
        (lambda m: m["onnx"]["inputs"][1].pop("dtype"), r"missing field 'onnx.inputs\[1\].dtype'"),
        (lambda m: m["onnx"]["variants"]["int8"].update(sha256=None), r"'onnx.variants.int8.sha256' must be str"),
        (lambda m: m["tokenizer"].update(max_length="16"), r"'tokenizer.max_length' must be int, found str"),
        (lambda m: m["tokenizer"].update(max_length=1), r"'tokenizer.max_length' must be >= 2"),
        (lambda m: m["tokenizer"].update(pad_id=True), r"'tokenizer.pad_id' must be a number, found bool"),
        (lambda m: m.update(quality=[1]), r"field 'quality' must be dict"),
    ],
)
def test_bad_manifests_are_refused_naming_the_field(bundles, edit_manifest, change, field):
    edit_manifest(bundles / "toy-single", change)
    with pytest.raises(BundleError, match=field) as caught:
        read_manifest(bundles / "toy-single")
    assert "toy-single/manifest.json" in str(caught.value)  # which file


def test_not_json_and_wrong_folder_name(bundles):
    (bundles / "toy-single" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_manifest(bundles / "toy-single")
    (bundles / "toy-pair").rename(bundles / "other")
    with pytest.raises(BundleError, match="does not match the folder name 'other'"):
        read_manifest(bundles / "other")


def test_escaping_paths_are_refused(bundles, edit_manifest):
    edit_manifest(bundles / "toy-pair", lambda m: m["onnx"].update(file="../toy-single/model.onnx"))
    with pytest.raises(BundleError, match="leaves the bundle folder"):
        Router(bundles, device="cpu").predict("toy-pair", [("a", "b")])
    edit_manifest(bundles / "toy-pair", lambda m: m["onnx"].update(file="/etc/passwd"))
    with pytest.raises(BundleError, match="is absolute"):
        read_manifest(bundles / "toy-pair")
    edit_manifest(bundles / "toy-single", lambda m: m["onnx"]["variants"]["fp16"].update(file="../../x.onnx"))
    with pytest.raises(BundleError, match=r"onnx.variants.fp16.file '../../x.onnx' leaves the bundle folder"):
        read_manifest(bundles / "toy-single")


def test_discovery_ignores_work_areas_and_unfinished_folders(bundles):
    (bundles / "half").mkdir()
    (bundles / "half" / "model.onnx").write_bytes(b"x")
    (bundles / ".toy-single.tmp-123-abc").mkdir()
    (bundles / "Upper").mkdir()
    (bundles / "Upper" / "manifest.json").write_text("{}")
    assert sorted(discover(bundles)) == ["toy-pair", "toy-single"]
    with pytest.raises(BundleError, match="bundle root is not a folder"):
        discover(bundles / "missing")


def test_summary_holds_no_local_paths(bundles):
    summary = read_manifest(bundles / "toy-single").summary(provider="CPUExecutionProvider", precision="int8")
    text = json.dumps(summary)
    assert str(bundles) not in text and "/tmp" not in text
    assert summary["labels"] == ["no", "yes"] and summary["precisions"] == ["fp32", "fp16", "int8"]
    assert summary["adaptation"] == {"mode": "finetune", "extra_positions": 0}
    assert summary["provider"] == "CPUExecutionProvider" and summary["serving_precision"] == "int8"
