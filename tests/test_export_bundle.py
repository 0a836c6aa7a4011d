"""The writer side of the bundle contract: manifests written by the real pipeline, the pure
``manifest_for``, and atomic bundle writes that lose nothing on Ctrl-C, exceptions, SIGKILL or
concurrent writers."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from doe_export.bundle import BundleWriter, manifest_for
from doe_export.errors import ConfigError
from doe_runtime import BundleError, Router
from doe_runtime.bundle import read_manifest, verify_files


def publish(root, task, source, created="now"):
    """Write a copy of ``source``'s bundle as ``task`` through a BundleWriter."""
    document = json.loads((source / "manifest.json").read_text())
    document["task"]["name"] = task
    document["created"] = created
    with BundleWriter(root, task) as writer:
        for name in ("model.onnx", "tokenizer.json"):
            shutil.copy(source / name, writer.folder / name)
        for variant in document["onnx"].get("variants", {}).values():
            shutil.copy(source / variant["file"], writer.folder / variant["file"])
        writer.write_manifest(document)
    return writer.path


def test_manifest_records_the_contract(bundles):
    root, results = bundles
    manifest = read_manifest(root / "toy-single")
    assert manifest.task.name == "toy-single" and manifest.task.labels == ("no", "yes")
    assert manifest.task.metric == "accuracy"
    assert manifest.onnx.input_names == ["input_ids", "attention_mask"]
    assert manifest.onnx.opset >= 17
    raw = manifest.to_json()
    assert raw["onnx"]["exporter"] == "torchscript"
    assert manifest.validation["max_abs_diff"] <= 1e-4 and manifest.validation["label_agreement"] == 1.0
    assert len(manifest.validation["shapes"]) >= 2
    assert manifest.quality["size"] == 24 and manifest.quality["split"] == "generated test"
    assert manifest.architecture["ffn_widths"] == [13, 13]  # round(37 * 0.35)
    assert manifest.pruning["rate"] == 0.65 and manifest.pruning["params_after"] < manifest.pruning["params_before"]
    assert manifest.versions["torch"].startswith("2.13")
    assert manifest.extra_positions == 0 and manifest.adaptation["mode"] == "finetune"
    assert manifest.adaptation["recovery"]["distill"] == 0.5 and manifest.adaptation["recovery"]["params"] == "all"
    assert results["toy-single"].expert_onnx == manifest.quality["expert_onnx"]
    assert sorted(manifest.onnx.variants) == ["fp16", "int8"] or "variants_left_out" in manifest.quality
    for precision, variant in manifest.onnx.variants.items():
        check = variant.validation["test_split"]
        assert check["size"] == 24 and check["label_agreement"] >= 0.99, precision
        assert variant.quality["value"] == check["value"]
    assert verify_files(root / "toy-single", manifest)


def test_every_form_of_the_expert_carries_its_interval_against_dense(bundles):
    """quality: each form (PyTorch, ONNX fp32, every variant) minus dense with a paired bootstrap interval;
    the dense model against the majority answer; a verdict only where the dense model learned the task."""
    root, results = bundles
    for task in ("toy-single", "toy-pair"):
        quality, result = read_manifest(root / task).quality, results[task]
        intervals = quality["expert_minus_dense"]
        assert set(intervals) == {"expert", "fp32", *read_manifest(root / task).onnx.variants}
        for interval in intervals.values():
            assert interval["low"] <= interval["value"] <= interval["high"] and interval["items"] == 24
            assert interval["level"] == 0.95 and interval["resamples"] == 2000 and interval["seed"] == 0
            assert ("within" in interval) == quality["dense_learned"]
        assert intervals["expert"]["value"] == pytest.approx(quality["expert"] - quality["dense"])
        assert intervals["fp32"]["value"] == pytest.approx(quality["expert_onnx"] - quality["dense"])
        majority = quality["dense_minus_majority"]
        assert majority["learned"] == quality["dense_learned"] == (majority["low"] > 0) == result.dense_learned
        assert result.uncertainty["expert_minus_dense"] == intervals
        served = "int8" if "int8" in intervals else "fp32"
        assert result.served_vs_dense.startswith(served + " ")
        if not result.dense_learned:  # 24 generated items: the tiny model may not beat the majority
            assert result.served_vs_dense.endswith("dense NOT LEARNED")


def test_manifest_for_is_pure_and_checked_by_the_reader(bundles):
    root, _ = bundles
    sections = {
        key: value
        for key, value in json.loads((root / "toy-pair" / "manifest.json").read_text()).items()
        if key != "schema_version"
    }
    built = manifest_for(**sections)
    assert built["schema_version"] == 1 and built["task"] == sections["task"]
    sections["task"] = {**sections["task"], "labels": []}
    with pytest.raises(BundleError, match=r"'task\.labels' must be a non-empty list"):
        manifest_for(**sections)


def test_interrupted_export_keeps_previous_bundle(bundles):
    root, _ = bundles
    before = (root / "toy-single" / "model.onnx").read_bytes()
    with pytest.raises(KeyboardInterrupt), BundleWriter(root, "toy-single") as writer:
        (writer.folder / "model.onnx").write_bytes(b"half a model")
        raise KeyboardInterrupt  # the user pressed Ctrl-C half-way
    assert (root / "toy-single" / "model.onnx").read_bytes() == before
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # temp folder cleaned, no lock file
    with pytest.raises(ConfigError, match="without write_manifest"), BundleWriter(root, "toy-single") as writer:
        (writer.folder / "model.onnx").write_bytes(b"no manifest follows")
    assert (root / "toy-single" / "model.onnx").read_bytes() == before
    assert Router(root, device="cpu").predict("toy-single", ["good"])[0].label_id in (0, 1)


def test_orphan_of_a_writer_killed_mid_swap_is_restored(bundles):
    root, _ = bundles
    (root / "toy-single").rename(root / ".toy-single.previous")  # killed between its two renames
    with pytest.raises(RuntimeError), BundleWriter(root, "toy-single"):
        raise RuntimeError("export failed")
    assert read_manifest(root / "toy-single").task.name == "toy-single"
    assert not (root / ".toy-single.previous").exists()


def test_bundle_folders_follow_the_umask_and_leave_no_lock_files(bundles):
    root, _ = bundles
    path = publish(root, "copy", root / "toy-single")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # not mkdtemp's 0700: another user's server can read it
    assert sorted(p.name for p in root.iterdir()) == ["copy", "toy-pair", "toy-single"]


def test_concurrent_exports_of_one_task_end_with_one_complete_bundle(bundles):
    """Writers racing on one task: the survivor is whole (its files match its own manifest)."""
    root, _ = bundles
    source = root.parent / "source"
    shutil.copytree(root / "toy-single", source)
    errors = []

    def writer(index):
        try:
            for _ in range(5):
                publish(root, "toy-single", source, created=f"writer {index}")
        except Exception as exc:  # returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    final = read_manifest(root / "toy-single")
    verify_files(root / "toy-single", final)
    assert final.created.startswith("writer ")
    assert sorted(p.name for p in root.iterdir()) == ["toy-pair", "toy-single"]


def test_export_killed_with_sigkill_keeps_previous_bundle_served(bundles, tmp_path):
    """A writer process killed with SIGKILL half-way: the old bundle stays whole and served, and the
    next writer removes the dead writer's temp folder."""
    root, _ = bundles
    before = (root / "toy-single" / "model.onnx").read_bytes()
    ready = tmp_path / "ready"
    script = (
        "import time\n"
        "from pathlib import Path\n"
        "from doe_export.bundle import BundleWriter\n"
        f"with BundleWriter(Path({str(root)!r}), 'toy-single') as writer:\n"
        "    (writer.folder / 'model.onnx').write_bytes(b'half a model')\n"
        f"    Path({str(ready)!r}).write_text('x')\n"
        "    time.sleep(60)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert writer.poll() is None and time.monotonic() < deadline, "writer did not start"
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".toy-single.tmp-")]
    assert len(leftovers) == 1  # SIGKILL leaves its temp folder; readers ignore it
    assert (root / "toy-single" / "model.onnx").read_bytes() == before
    assert Router(root, device="cpu").predict("toy-single", ["good"])[0].label_id in (0, 1)
    source = tmp_path / "source"
    shutil.copytree(root / "toy-single", source)
    publish(root, "toy-single", source)
    assert not [p for p in root.iterdir() if p.name.startswith(".toy-single.tmp-")]


def test_rebuilds_leave_no_moment_without_the_bundle(bundles):
    """The swap is one atomic exchange (renameat2): a reader polling the folder never misses the task."""
    from doe_runtime.bundle import discover

    root, _ = bundles
    source = root.parent / "source"
    shutil.copytree(root / "toy-single", source)
    stop, missing, polls = threading.Event(), [], [0]

    def watch():
        while not stop.is_set():
            polls[0] += 1
            if "toy-single" not in discover(root) or not (root / "toy-single" / "manifest.json").is_file():
                missing.append(polls[0])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for index in range(30):
            publish(root, "toy-single", source, created=f"build {index}")
    finally:
        stop.set()
        watcher.join()
    assert polls[0] > 30 and missing == []
    assert read_manifest(root / "toy-single").created == "build 29"


def test_int8_recipes_name_the_nodes_they_keep_in_fp32(bundles):
    from doe_export.variants import INT8_RECIPES, recipe_exclusions

    root, _ = bundles
    graph = root / "toy-single" / "model.onnx"
    assert recipe_exclusions(INT8_RECIPES[0], graph) == []
    first = recipe_exclusions("per-channel, first layer fp32", graph)
    down = recipe_exclusions("per-channel, FFN down-projections fp32", graph)
    assert first and all("/layer.0/" in name for name in first) and any("intermediate" in name for name in first)
    assert len(down) == 2 and all("output/dense" in n and "attention" not in n for n in down)  # one per layer
    raw = read_manifest(root / "toy-single").to_json()["onnx"].get("variants", {}).get("int8")
    assert raw is None or raw["recipe"] in INT8_RECIPES  # the bundle says which recipe its int8 graph passed with
