"""`doe study localization --quick`: the real study code on a tiny model and generated data.
Records complete, reruns identical, resumable, and bad data stops before any training."""

import re
from dataclasses import replace

import pytest

from doe_export import study
from doe_export.bench import common
from doe_export.cli import main
from doe_export.errors import ConfigError
from doe_export.specs import AdaptSpec
from doe_export.tasks import synthetic_task


def _quick(out, cache, methods="doe,random,magnitude", *extra):
    return main(
        [
            "study",
            "localization",
            "--quick",
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            "--no-progress",
            "--methods",
            methods,
            *extra,
        ]
    )


def test_quick_study_records_report_and_determinism(tmp_path):
    assert _quick(tmp_path / "a", tmp_path / "cache-a") == 0
    records = common.read_jsonl(tmp_path / "a" / "localization.jsonl")
    header, rows = records[0], records[1:]
    assert header["suite"] == "localization" and header["versions"]["torch"].startswith("2.13")
    runs = [r for r in rows if r["kind"] == "run"]
    dense = [r for r in rows if r["kind"] == "dense"]
    config = study.StudyConfig(**{**study.QUICK, "methods": ("doe", "random", "magnitude")})
    # the toy task's adaptation takes its whole training split: nothing is left for the more-data variants, and
    # no other task's texts are set for it
    skipped = (*study.MORE_DATA_VARIANTS, "other-texts")
    planned = [s for s in study.run_specs(config) if s["variant"] not in skipped]
    assert len(dense) == 1 and len(runs) == len(planned) < len(study.run_specs(config))
    assert dense[0]["majority"] == {"label": "no", "value": 0.5}  # generated labels alternate: ties -> first label
    for run in runs:
        assert 0.0 <= run["value"] <= 1.0 and 0.0 <= run["value_before_recovery"] <= 1.0
        assert run["split_size"] == 24 and run["metric"] == "accuracy"
        assert run["ffn_widths"] == [round(37 * (1 - run["rate"]))] * 2 or run["variant"] == "global-budget"
    assert {r["seed"] for r in runs if r["method"] == "random" and r["rate"] == 0.5} == {0, 1}
    assert {r["variant"] for r in runs} >= {
        "default",
        "max-tokens",
        "global-budget",
        "fold-bias",
        "no-prompt-tuning",
        "mean-abs",
        "gradual-2",
        "hidden-distill",
        "recovery-4",
        "calib-8",
    }
    assert dense[0]["labels"] and len(dense[0]["labels"]) == len(dense[0]["preds"]) == 24
    assert all(len(r["preds"]) == len(r["preds_before_recovery"]) == 24 for r in runs)
    assert {r["recovery_seed"] for r in runs if r["method"] == "doe"} == {study.QUICK_FLOW.recovery.seed}
    report = (tmp_path / "a" / "localization.md").read_text()
    assert "## toy" in report and "## Targets" in report and "DoE ablations" in report
    ablation = next(line for line in report.splitlines() if line.startswith("| ranked by the mean of the absolute h·g"))
    assert re.search(r"\| [\d.]+ \([\d.]+\); [+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\], a (win|tie|loss) \|", ablation)
    assert (
        "## DoE against each baseline" in report
        and "task × rate × baseline comparisons on learned tasks: DoE wins" in report
    )
    assert "| DoE − dense, 95% CI |" in report
    assert "### The variants against the dense model" not in report  # toy is not learned: nothing to hold
    assert "majority label 'no': 50.0" in report
    assert (tmp_path / "a" / "localization.png").read_bytes()[:4] == b"\x89PNG"

    # same seed, fresh caches: the same numbers
    assert _quick(tmp_path / "b", tmp_path / "cache-b") == 0
    again = common.read_jsonl(tmp_path / "b" / "localization.jsonl")[1:]
    assert [r["after_recovery"] for r in again] == [r["after_recovery"] for r in rows]
    assert len({r["after_recovery"]["gold_logprob"] for r in runs}) > 1  # the comparison is not vacuous


def test_quick_study_resumes_and_grows(tmp_path, monkeypatch):
    assert _quick(tmp_path / "out", tmp_path / "cache", methods="doe") == 0
    first = common.read_jsonl(tmp_path / "out" / "localization.jsonl")
    calls = []
    original = study.run_record
    monkeypatch.setattr(
        study, "run_record", lambda runner, config, spec: calls.append(spec) or original(runner, config, spec)
    )
    assert _quick(tmp_path / "out", tmp_path / "cache", methods="doe") == 0
    assert calls == []  # nothing recomputed
    assert _quick(tmp_path / "out", tmp_path / "cache", methods="doe,magnitude") == 0
    assert {c["method"] for c in calls} == {"magnitude"}  # only the new method runs
    grown = common.read_jsonl(tmp_path / "out" / "localization.jsonl")
    assert grown[: len(first)][1:] == first[1:]

    # a narrower invocation adds nothing and keeps the earlier ones' runs in the header the report reads
    calls.clear()
    assert _quick(tmp_path / "out", tmp_path / "cache", "doe", "--rates", "0.5", "--no-ablations") == 0
    assert calls == []
    header = common.read_jsonl(tmp_path / "out" / "localization.jsonl")[0]["config"]
    assert header["methods"] == ["doe", "magnitude"] and header["rates"] == [0.5, 0.8]
    assert "mean-abs" in header["ablations"] and header["tasks"] == ["toy"]
    assert "### p=0.8" in (tmp_path / "out" / "localization.md").read_text()

    # a rate where a baseline has no run yet: the report names it instead of a row of dashes
    from doe_export.study_report import render

    def report_of(records):
        common.write_jsonl(tmp_path / "partial" / "localization.jsonl", records)
        report = render(tmp_path / "partial" / "localization.jsonl", tmp_path / "partial").read_text()
        return report.split("### p=0.5")[1].split("### p=0.8")[0], report.split("### p=0.8")[1].split("Over all")[0]

    gradient_at_05 = [{**r, "method": "gradient"} for r in grown if r.get("method") == "magnitude" and r["rate"] == 0.5]
    at_05, at_08 = report_of(grown + gradient_at_05)
    assert "| gradient |" in at_05 and "| magnitude |" in at_05 and "Not run" not in at_05
    assert "| magnitude |" in at_08 and "| gradient |" not in at_08
    assert "Not run beside DoE at this rate: gradient." in at_08
    # more seeds of DoE alone (a learned task: dense answers every item right): a tie still rests on the one
    # seed magnitude has, and the report says so
    doe_seeds = [
        {**r, "seed": s} for r in grown if r.get("method") == "doe" and r.get("variant") == "default" for s in (1, 2)
    ]
    learned = [{**r, "preds": r["labels"]} if r.get("kind") == "dense" else r for r in grown]
    report_of(learned + doe_seeds)
    assert "p=0.5: tied with magnitude (1)" in (tmp_path / "partial" / "localization.md").read_text()
    at_05, at_08 = report_of([r for r in grown if not (r.get("method") == "magnitude" and r.get("rate") == 0.8)])
    assert "| magnitude |" in at_05 and "No baseline has a run beside DoE's at this rate yet." in at_08

    # a learned task (dense answers every item right): each ablation's average over the learned tasks is its
    # one task's interval against the default
    report_of(learned)
    # ... and the answers DoE's expert changes against it are the ones it gets wrong, per rate
    text = (tmp_path / "partial" / "localization.md").read_text()
    assert "## How many answers DoE's experts change" in text
    changes = next(line for line in text.split("## How many answers")[1].splitlines() if line.startswith("| toy |"))
    wrong = {
        r["rate"]: 100
        * sum(p != y for p, y in zip(r["preds"], next(d["labels"] for d in grown if d.get("kind") == "dense")))
        / 24
        for r in grown
        if r.get("method") == "doe" and r.get("variant") == "default"
    }
    assert changes.split(" | ")[1:3] == ["0.0", f"{wrong[0.5]:.1f}"] and f"| {wrong[0.8]:.1f} |" in changes
    row = next(
        line
        for line in (tmp_path / "partial" / "localization.md").read_text().splitlines()
        if line.startswith("| ranked by the mean of the absolute")
    )
    task_cell, average_cell = row.strip("| ").split(" | ")[1:]
    assert average_cell.endswith((", a win", ", a tie", ", a loss")) and task_cell.endswith(average_cell)
    # ... and each variant against the dense model, with the 1-point verdict (dense is right on every item)
    against = text.split("### The variants against the dense model at p=0.65")[1].split("\n\n")[1].splitlines()
    ranked = [r["value"] for r in grown if r.get("variant") == "mean-abs"]
    row = next(line for line in against if line.startswith("| ranked by the mean of the absolute"))
    assert against[2].startswith("| default | ") and len(against) == 2 + len({r["variant"] for r in learned[1:]})
    assert re.fullmatch(
        rf"\| .* \| {100 * (sum(ranked) / len(ranked) - 1):+.1f} \[[+-][\d.]+, [+-][\d.]+\], missed \|", row
    )

    # a second learned task the variant did not run on: the average is the first task's, and says so
    other = [{**r, "task": "toy2"} for r in learned[1:] if r.get("kind") == "dense" or r.get("variant") == "default"]
    header = {**learned[0], "config": {**learned[0]["config"], "tasks": ["toy", "toy2"]}}
    report_of([header, *learned[1:], *other])
    row = next(
        line
        for line in (tmp_path / "partial" / "localization.md").read_text().splitlines()
        if line.startswith("| ranked by the mean of the absolute")
    )
    task_cell, _, average_cell = row.strip("| ").split(" | ")[1:]
    assert average_cell == task_cell.split("; ")[1] + " (toy only)"

    # toy2 with runs at p=0.5 alone: the p=0.8 averages are toy's, and say so
    at_05, at_08 = report_of([header, *learned[1:], *(r for r in other if r["kind"] == "dense" or r["rate"] == 0.5)])
    assert "(without toy2) |" in at_08 and "without" not in at_05
    assert "; p=0.8 without toy2 (DoE has no runs there)." in (tmp_path / "partial" / "localization.md").read_text()


def test_more_data_variant_recovers_on_the_items_past_the_adaptations(tmp_path, capsys):
    """With 40 of the toy task's 48 training items adapting, the more-data run recovers on the 24 the flow's
    recovery takes plus the 8 left over; with none left over it is not run, and the log says why."""
    args = ("--ablations", "more-data,more-texts")
    assert _quick(tmp_path / "a", tmp_path / "cache", "doe", "--train-sizes", "toy=40", *args) == 0
    runs = [r for r in common.read_jsonl(tmp_path / "a" / "localization.jsonl")[1:] if r["kind"] == "run"]
    assert {(r["variant"], r["recovery_examples"]) for r in runs} == {
        ("default", 24),
        ("more-data", 32),
        ("more-texts", 32),
    }
    assert "recovery also trains on up to 8,000 training items past" in (tmp_path / "a" / "localization.md").read_text()
    capsys.readouterr()
    assert _quick(tmp_path / "b", tmp_path / "cache", "doe", *args) == 0
    runs = [r for r in common.read_jsonl(tmp_path / "b" / "localization.jsonl")[1:] if r["kind"] == "run"]
    assert {r["variant"] for r in runs} == {"default"}
    assert "[toy] more-data, more-texts not run: the adaptation trains on the whole training split" in (
        capsys.readouterr().err
    )


def test_other_texts_variant_recovers_on_another_tasks_texts(tmp_path, capsys, monkeypatch):
    """The other-texts run recovers on the flow's 24 items plus the 20 texts of the task OTHER_TEXTS names for
    it, and its record says how many; a task with none named is not run, and the log says why."""
    from doe_export import tasks

    other = synthetic_task("other", n_train=20, seed=3)
    monkeypatch.setattr(tasks, "load_task", lambda name, *a, **k: other if name == "other" else pytest.fail(name))
    monkeypatch.setattr(study, "OTHER_TEXTS", {"toy": "other"})
    assert _quick(tmp_path / "a", tmp_path / "cache", "doe", "--ablations", "other-texts") == 0
    runs = [r for r in common.read_jsonl(tmp_path / "a" / "localization.jsonl")[1:] if r["kind"] == "run"]
    assert {(r["variant"], r["recovery_examples"]) for r in runs} == {("default", 24), ("other-texts", 44)}
    assert "training texts of another task" in (tmp_path / "a" / "localization.md").read_text()
    monkeypatch.setattr(study, "OTHER_TEXTS", {})
    capsys.readouterr()
    assert _quick(tmp_path / "b", tmp_path / "cache", "doe", "--ablations", "other-texts") == 0
    runs = [r for r in common.read_jsonl(tmp_path / "b" / "localization.jsonl")[1:] if r["kind"] == "run"]
    assert {r["variant"] for r in runs} == {"default"}
    assert "[toy] other-texts not run: no other task's texts are set for it" in capsys.readouterr().err


def test_ablation_variants_change_what_they_name():
    config = study.StudyConfig(**study.QUICK)
    default = config.prune_spec({"method": "doe", "variant": "default", "rate": 0.65, "seed": 0})
    ranked = config.prune_spec({"method": "doe", "variant": "mean-abs", "rate": 0.65, "seed": 0})
    gradual = config.prune_spec({"method": "doe", "variant": "gradual-2", "rate": 0.65, "seed": 0})
    assert (default.rank, default.steps) == ("abs-of-mean", 1)
    assert ranked == replace(default, rank="mean-abs") and gradual == replace(default, steps=2)
    run = {"method": "doe", "variant": "default", "rate": 0.65, "seed": 1}
    recovery = config.recovery_spec(run)
    assert recovery.seed == config.flow.recovery.seed + 1 and recovery.hidden_distill == 0.0
    for variant, changed in (
        ("hidden-distill", {"hidden_distill": study.HIDDEN_DISTILL_WEIGHT}),
        ("recovery-4", {"epochs": 4}),
        ("augment-2", {"augment": study.AUGMENT_COPIES}),
        ("more-data", {"extra_examples": study.MORE_DATA}),
        ("more-texts", {"extra_examples": study.MORE_DATA, "extra_labels": "dense"}),
    ):
        assert config.recovery_spec({**run, "variant": variant}) == replace(recovery, **changed)
        assert config.prune_spec({**run, "variant": variant}) == config.prune_spec(run)  # recovery levers only
    texts = {"extra_examples": study.MORE_DATA, "extra_labels": "dense", "extra_from": "snli"}
    assert config.recovery_spec({**run, "task": "rte", "variant": "other-texts"}) == replace(recovery, **texts)
    # a chosen subset, with DoE's own run at 0.65 to compare them with; older headers said True / False
    chosen = study.StudyConfig(**{**study.QUICK, "methods": ("random",), "ablations": ("mean-abs", "calib")})
    assert [(s["method"], s["variant"], s["rate"]) for s in study.run_specs(chosen) if s["method"] == "doe"] == [
        ("doe", "default", 0.65),
        ("doe", "mean-abs", 0.65),
        ("doe", "calib-8", 0.65),
    ]
    seeded = study.StudyConfig(**{**study.QUICK, "methods": ("doe",), "seeds": (0, 1), "ablations": ("mean-abs",)})
    assert sorted((s["variant"], s["seed"]) for s in study.run_specs(seeded) if s["rate"] == 0.65) == [
        ("default", 0),
        ("default", 1),
        ("mean-abs", 0),
        ("mean-abs", 1),
    ]  # the variants on every seed, each with DoE's own run to pair with
    assert study.StudyConfig.from_json({**config.to_json(), "ablations": False}).ablations == ()
    assert "gradual-2" in study.StudyConfig.from_json({**config.to_json(), "ablations": True}).ablations
    with pytest.raises(ConfigError, match=r"unknown ablations \['mean'\]; available: max-tokens, .*calib"):
        study.StudyConfig(**{**study.QUICK, "ablations": ("mean",)})


def test_ablations_flag_chooses_variants(tmp_path, capsys):
    args = ["study", "localization", "--quick", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    assert main([*args, "--no-progress", "--methods", "doe", "--ablations", "gradual-2"]) == 0
    runs = [r for r in common.read_jsonl(tmp_path / "o" / "localization.jsonl") if r["kind"] == "run"]
    assert sorted((r["variant"], r["rate"]) for r in runs) == [
        ("default", 0.5),
        ("default", 0.65),
        ("default", 0.8),
        ("gradual-2", 0.65),
    ]
    assert main([*args, "--ablations", "bogus"]) == 2
    assert "unknown ablations ['bogus']" in capsys.readouterr().err


def test_changed_settings_are_refused(tmp_path, capsys):
    assert _quick(tmp_path / "out", tmp_path / "cache", methods="doe") == 0
    path = tmp_path / "out" / "localization.jsonl"
    records = common.read_jsonl(path)
    records[0]["config"]["flow"]["data"]["max_length"] = 99
    common.write_jsonl(path, records)
    assert _quick(tmp_path / "out", tmp_path / "cache", methods="doe") == 2
    assert "other settings of ['data.max_length']" in capsys.readouterr().err


def test_grown_study_refuses_a_dense_model_that_is_not_the_recorded_one(tmp_path, capsys):
    # a cache lost between sessions retrains the dense model; new runs pair with the recorded dense predictions
    assert _quick(tmp_path / "out", tmp_path / "cache", "doe", "--rates", "0.5", "--no-ablations") == 0
    path = tmp_path / "out" / "localization.jsonl"
    # retrained in a fresh cache: the same seeds give the same model, and the study grows
    assert _quick(tmp_path / "out", tmp_path / "fresh", "doe,magnitude", "--rates", "0.5", "--no-ablations") == 0
    grown = common.read_jsonl(path)
    assert {r["method"] for r in grown if r.get("kind") == "run"} == {"doe", "magnitude"}
    # a recorded dense model the adapted one does not reproduce: refused, nothing appended
    dense = next(r for r in grown if r.get("kind") == "dense")
    dense["preds"][3] = 1 - dense["preds"][3]
    common.write_jsonl(path, grown)
    assert _quick(tmp_path / "out", tmp_path / "cache", "doe,magnitude,random", "--rates", "0.5", "--no-ablations") == 2
    err = capsys.readouterr().err
    assert "dense model of task 'toy'" in err and "1 of 24 test predictions differ" in err and "--cache-dir" in err
    assert common.read_jsonl(path)[1:] == grown[1:]  # no run appended


def test_bad_data_stops_before_training(tmp_path, capsys, monkeypatch):
    glue = tmp_path / "glue"
    (glue / "SST-2").mkdir(parents=True)
    (glue / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"s {i} \t{i % 2}\n" for i in range(40)))
    (glue / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nok \t1\n")
    from doe_export import loading

    monkeypatch.setattr(loading, "load_model", lambda *a: pytest.fail("the model must not load before the checks"))
    args = ["study", "localization", "--data-dir", str(glue), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(args + ["--tasks", "sst2"]) == 2
    assert (
        "task 'sst2': calibration needs 1024 examples but the train split (GLUE SST-2 train" in capsys.readouterr().err
    )
    assert main(args + ["--tasks", "sst2,rte"]) == 2
    assert "RTE: no such folder" in capsys.readouterr().err
    (glue / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nok \t3\n")
    assert main(args + ["--tasks", "sst2"]) == 2
    assert "SST-2/dev.tsv:2: label '3'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "localization.jsonl").exists()


def test_quick_recovery_study_records_and_report(tmp_path):
    from doe_export import records as record_io
    from doe_export.cli import main as cli

    assert (
        cli(
            [
                "study",
                "recovery",
                "--quick",
                "--out",
                str(tmp_path / "out"),
                "--cache-dir",
                str(tmp_path / "c"),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = record_io.read_jsonl(tmp_path / "out" / "recovery.jsonl")
    assert rows[0]["suite"] == "recovery" and len(rows) == 3
    for row in rows[1:]:
        assert set(row["after"]) == {"dev", "test"} and 0 <= row["after"]["test"] <= 1 and row["task"] == "toy"
    assert [r["distill"] for r in rows[1:]] == [0.0, 0.5]
    report = (tmp_path / "out" / "recovery.md").read_text()
    assert "| 1 epoch, cross-entropy |" in report and "Smallest average loss" in report


def test_quick_study_seeds_every_method_and_pairs_the_runs(tmp_path):
    """--seeds runs every method at every rate once per seed (the recovery reshuffled), and the report pairs
    DoE with each baseline on the seeds both have."""
    from doe_export import study_report

    out = tmp_path / "out"
    args = ["study", "localization", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert main([*args, "--methods", "doe,magnitude", "--seeds", "0,1", "--no-ablations"]) == 0
    runs = [r for r in common.read_jsonl(out / "localization.jsonl")[1:] if r["kind"] == "run"]
    for method in ("doe", "magnitude"):
        for rate in (0.5, 0.8):
            cell = [r for r in runs if r["method"] == method and r["rate"] == rate]
            assert sorted(r["seed"] for r in cell) == [0, 1]
            assert len({r["recovery_seed"] for r in cell}) == 2
    assert len({r["after_recovery"]["gold_logprob"] for r in runs if r["method"] == "doe"}) > 1
    report = study_report.Runs(common.read_jsonl(out / "localization.jsonl"))
    value, spread, items = report.doe_minus("toy", "magnitude", 0.5)
    doe = [r["value"] for r in runs if r["method"] == "doe" and r["rate"] == 0.5]
    magnitude = [r["value"] for r in runs if r["method"] == "magnitude" and r["rate"] == 0.5]
    assert value == pytest.approx(sum(doe) / 2 - sum(magnitude) / 2) and items == 24 and len(spread) == 2000


def test_train_sizes_are_per_task_and_part_of_the_records_identity(tmp_path, capsys):
    config = study.StudyConfig(train_sizes={"cola": None, "rte": 300})
    assert config.flow_for("cola").data.max_train is None and config.flow_for("rte").data.max_train == 300
    assert config.flow_for("sst2") == config.flow
    out = tmp_path / "out"
    args = ["study", "localization", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    args += ["--methods", "doe", "--no-ablations"]
    assert main([*args, "--train-sizes", "toy=40"]) == 0
    assert [r["train_size"] for r in common.read_jsonl(out / "localization.jsonl") if r.get("kind") == "dense"] == [40]
    assert main([*args, "--train-sizes", "toy=30"]) == 2
    assert "other settings of ['train_sizes.toy']" in capsys.readouterr().err
    assert main([*args, "--train-sizes", "toy"]) == 2
    assert "--train-sizes: expected TASK=N or TASK=none, got 'toy'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="training size of task 'rte' must be >= 1"):
        study.StudyConfig(train_sizes={"rte": -3})


def test_comparison_plot_draws_each_interval_and_draws_nothing_without_learned_tasks(tmp_path):
    from doe_export import study_plots
    from doe_export.uncertainty import Interval

    def interval(value: float) -> Interval:
        return Interval(value, value - 0.02, value + 0.02, 0.95, 2000, 0, 100)

    table = {0.65: {"random": {"a": interval(0.03), "b": interval(-0.01)}, "taylor": {"a": interval(-0.05)}}}
    path = study_plots.doe_against_baselines(table, ["a", "b"], tmp_path)
    assert path == tmp_path / "localization_vs_baselines.png" and path.read_bytes()[:4] == b"\x89PNG"
    assert study_plots.doe_against_baselines(table, [], tmp_path / "none") is None
    assert study_plots.doe_against_baselines({0.65: {"random": {}}}, ["a"], tmp_path / "none") is None


def test_intermediates_are_per_task_and_part_of_the_records_identity(tmp_path, capsys, monkeypatch):
    """`--intermediates toy=inter`: the task's dense model trains on `inter` first (its record says so),
    and records made without it are not extended with runs made with it."""
    import doe_export.tasks as tasks_module

    config = study.StudyConfig(intermediates={"rte": "snli"})
    assert config.flow_for("rte").adapt.intermediate == "snli" and config.flow_for("sst2") == config.flow
    with pytest.raises(ConfigError, match="prompt tuning keeps frozen"):
        study.StudyConfig(intermediates={"rte": "snli"}, flow=replace(config.flow, adapt=AdaptSpec(mode="prompt")))
    quick = study.QUICK_FLOW  # prompt tuning, which keeps the backbone frozen: fine-tune for this test
    finetune = replace(
        quick,
        adapt=replace(quick.adapt, mode="finetune", prompt_length=0),
        recovery=replace(quick.recovery, params="all"),
    )
    monkeypatch.setitem(study.QUICK, "flow", finetune)
    asked = []
    inter = synthetic_task("inter", kind="pair", n_train=24, seed=5)
    monkeypatch.setattr(tasks_module, "load_task", lambda name, *a, **k: asked.append(name) or inter)
    out = tmp_path / "out"
    args = ["study", "localization", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    args += ["--methods", "doe", "--no-ablations", "--rates", "0.5"]
    assert main([*args, "--intermediates", "toy=inter"]) == 0
    assert asked == ["inter"]
    dense = [r for r in common.read_jsonl(out / "localization.jsonl") if r.get("kind") == "dense"]
    assert [r["intermediate"] for r in dense] == ["inter"]
    assert main(args) == 2
    assert "other settings of ['intermediates.toy']" in capsys.readouterr().err
    assert main([*args, "--intermediates", "toy"]) == 2
    assert "--intermediates: expected TASK=INTERMEDIATE (e.g. rte=snli), got 'toy'" in capsys.readouterr().err
