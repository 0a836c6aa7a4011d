"""The stage API: one flow for build, study and bench; the specs refuse bad settings; the training
loop keeps the best dev epoch and distils as written; calibration gathers only what is needed."""

import copy
import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from doe_export import adapt, attribution, rate_search, scorers, stages
from doe_export.errors import ConfigError
from doe_export.loading import LoadedModel, fast_tokenizer
from doe_export.records import to_json
from doe_export.specs import AdaptMode, BuildConfig, LayerTypes, TrainedParams
from doe_export.stages import AdaptSpec, DataSpec, ExportSpec, PruneSpec, RecoverySpec
from doe_export.tasks import synthetic_task
from doe_runtime.errors import TaskNameError


def test_study_path_and_build_make_identical_experts(tiny_backbone, hf_tokenizer, tmp_path):
    """`doe build` and the study/bench runner, same flow and seed: the same expert, weight for weight."""
    from doe_export.pipeline import build_task
    from doe_export.runner import TaskRunner

    data = synthetic_task("toy", n_train=64)
    backbone = tiny_backbone("bert")
    config = BuildConfig(
        out_dir=str(tmp_path / "out"),
        data=DataSpec(max_train=48, max_dev=8, max_length=24),
        adapt=AdaptSpec(epochs=2, lr=1e-3, batch_size=8),
        prune=PruneSpec(calib_examples=16, batch_size=8),
        recovery=RecoverySpec(batch_size=8),
        export=ExportSpec(fp16=False, int8=False),
        progress=False,
    )
    loaded = LoadedModel(copy.deepcopy(backbone), hf_tokenizer, "tiny-bert", "config", None)
    _, built_dense, built = build_task(config, loaded, data, return_models=True)

    flow = replace(config.flow, model="tiny")
    runner = TaskRunner(
        flow,
        data,
        LoadedModel(copy.deepcopy(backbone), hf_tokenizer, "tiny-bert", "config", None),
        tmp_path / "cache",
        progress=False,
    )
    result = runner.expert(config.prune)
    for name, value in built_dense.state_dict().items():
        assert torch.equal(value, runner.adapted.state_dict()[name]), f"dense {name}"
    got = result.model.state_dict()
    assert list(got) == list(built.state_dict())
    for name, value in built.state_dict().items():
        assert torch.equal(value, got[name]), f"expert {name}"


@pytest.mark.parametrize(
    "spec, message",
    [
        (lambda: stages.AdaptSpec(mode="prompt", prompt_length=0), "prompt tuning needs a prompt length >= 1"),
        (lambda: stages.AdaptSpec(mode="lora"), "adaptation mode must be one of"),
        (lambda: stages.AdaptSpec(lr=0.0), "learning rate must be > 0"),
        (lambda: stages.PruneSpec(rate=1.0), r"pruning rate must be in \[0, 1\)"),
        (lambda: stages.PruneSpec(scorer="psychic"), "unknown scorer 'psychic'; available"),
        (lambda: stages.PruneSpec(layer_types="both", scorer="taylor"), "cannot score attention heads"),
        (lambda: stages.RecoverySpec(params="head"), "recovery params must be one of"),
        (lambda: stages.RecoverySpec(distill=1.5), r"distillation weight must be in \[0, 1\]"),
        (lambda: stages.RecoverySpec(max_examples=0), "recovery max_examples must be an integer >= 1"),
        (lambda: stages.ExportSpec(exporter="tflite"), "exporter must be one of"),
        (lambda: stages.DataSpec(max_length=4), "max_length must be an integer >= 8"),
        (lambda: stages.PruneSpec(scorer="magnitude", token_agg="max"), "scorer 'magnitude' takes no option token_agg"),
        (lambda: stages.PruneSpec(scorer="random", rank="mean-abs"), "scorer 'random' takes no option rank"),
        (lambda: BuildConfig(recovery=RecoverySpec(params="prompt")), "recovery of the prompt and head needs a soft"),
        (lambda: BuildConfig(search_rates=(0.5, 1.2)), r"--search-rates must be rates in \(0, 1\)"),
    ],
)
def test_specs_refuse_bad_settings_on_construction(spec, message):
    with pytest.raises(ConfigError, match=message):
        spec()


def test_modes_are_enums_that_read_and_write_as_strings():
    spec = stages.AdaptSpec(mode="prompt")
    assert spec.mode is AdaptMode.PROMPT and spec.mode == "prompt" and spec.prompt_length == 20
    assert stages.AdaptSpec().prompt_length == 0 and stages.AdaptSpec().trains is TrainedParams.ALL
    assert spec.trains is TrainedParams.PROMPT
    assert json.dumps(to_json(spec))[:18] == '{"mode": "prompt",'
    assert stages.PruneSpec(layer_types="both").layer_types is LayerTypes.BOTH


@pytest.mark.parametrize(
    "config",
    [
        BuildConfig(),
        BuildConfig(
            tasks=("sst2", "mrpc"),
            adapt=AdaptSpec(mode="prompt", pooling="cls", lr=3e-3),
            prune=PruneSpec(rate=0.5, layer_types="both", head_rate=0.25, budget="global", round_to=64),
            recovery=RecoverySpec(params="prompt", lr=2e-3, distill=0.0),
            export=ExportSpec(fuse=True, int8=False),
            search_rates=(0.3, 0.6),
            max_loss=1.0,
        ),
    ],
)
def test_a_build_config_round_trips_through_its_record(config):
    """Every setting survives JSON (the records' form): pooling and the recovery learning rate included."""
    again = BuildConfig.from_json(json.loads(json.dumps(to_json(config))))
    assert again == config and again.adapt.mode is config.adapt.mode and isinstance(again.search_rates, tuple)


def test_study_and_bench_records_round_trip_to_identical_specs():
    from doe_export.bench.workbench import SuiteConfig, quick_flow
    from doe_export.study import QUICK, StudyConfig

    study = StudyConfig(
        **{
            **QUICK,
            "flow": replace(
                QUICK["flow"],
                adapt=AdaptSpec(mode="prompt", pooling="mean"),
                recovery=RecoverySpec(params="prompt", lr=1e-3),
            ),
        }
    )
    assert StudyConfig.from_json(json.loads(json.dumps(study.to_json()))) == study
    suite = SuiteConfig(tiny=True, flow=quick_flow(), load_connection_steps=(4, 8))
    assert SuiteConfig.from_json(json.loads(json.dumps(suite.to_json()))) == suite
    assert SuiteConfig.from_json(json.loads(json.dumps(SuiteConfig().to_json()))) == SuiteConfig()
    with pytest.raises(ConfigError, match=r"StudyConfig.flow.adapt: unknown settings \['epoch'\]"):
        StudyConfig.from_json({"flow": {"adapt": {"epoch": 3}}})


def test_records_of_the_first_studies_read_as_their_flow():
    """The committed localization records have a flat config; it maps to the same flow the study ran."""
    from doe_export.study import StudyConfig

    flat = {
        "model": "m",
        "tasks": ["sst2"],
        "adapt": "finetune",
        "lr": 8e-5,
        "prompt_length": 0,
        "epochs": 2,
        "max_train": 1024,
        "recovery_params": "all",
        "distill": 0.5,
        "recovery_epochs": 1,
        "calib_examples": 128,
        "recovery_examples": None,
        "recovery_on_dev": True,
        "rates": [0.5],
        "methods": ["doe"],
        "seed": 0,
    }
    config = StudyConfig.from_json(flat)
    assert config.tasks == ("sst2",) and config.rates == (0.5,) and config.flow.model == "m"
    assert config.flow.adapt == AdaptSpec(mode="finetune", prompt_length=0, epochs=2, lr=8e-5)
    assert config.flow.prune.calib_examples == 128 and config.flow.recovery.seed == 1
    assert config.flow.recovery == RecoverySpec(epochs=1, params="all", distill=0.5, select_on_dev=True)


def test_spec_key_changes_with_any_field():
    base = stages.spec_key(stages.AdaptSpec(), stages.DataSpec())
    assert base == stages.spec_key(stages.AdaptSpec(), stages.DataSpec())
    assert base != stages.spec_key(stages.AdaptSpec(epochs=2), stages.DataSpec())
    assert base != stages.spec_key(stages.AdaptSpec(), stages.DataSpec(max_train=10))
    assert base != stages.spec_key(stages.AdaptSpec(), stages.DataSpec(match_test_lengths=True))


def test_spec_key_of_a_field_added_later_is_the_key_from_before_it_at_its_default():
    """Fields added to a spec after models were cached under its key (DataSpec.match_test_lengths, AdaptSpec's
    intermediate training) must not move the key while at their default: the hash of the fields without them."""
    import dataclasses
    import hashlib
    import json

    data, adapt = stages.DataSpec(max_train=10), stages.AdaptSpec()
    added = ("match_test_lengths", "intermediate", "intermediate_examples", "intermediate_epochs")
    before = [{k: v for k, v in dataclasses.asdict(spec).items() if k not in added} for spec in (data, adapt)]
    payload = ["DataSpec", "AdaptSpec", *before, ["m", "t"]]
    old = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert stages.spec_key(data, adapt, extra=["m", "t"]) == old


def test_training_keeps_the_best_dev_epoch(tiny_backbone, hf_tokenizer, monkeypatch):
    """Dev metric scripted 0.9, 0.1, 0.5: the weights after training are those after epoch 1."""
    data = synthetic_task("toy")
    model = stages.new_model(LoadedModel(tiny_backbone("bert"), hf_tokenizer, "t", "c", None), data, stages.AdaptSpec())
    tokenizer = fast_tokenizer(hf_tokenizer, 24)
    scripted, snapshots = iter([0.9, 0.1, 0.5]), []

    def fake_dev(model_, tokenizer_, split, metric):
        snapshots.append({k: v.detach().clone() for k, v in model_.state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(adapt, "evaluate_torch", fake_dev)
    record = adapt.train(
        model,
        tokenizer,
        data.train,
        data.dev,
        metric="accuracy",
        config=adapt.TrainConfig("all", 3, 1e-3, 8, 0),
        progress=False,
    )
    assert record["best_epoch"] == 1 and record["dev_metric"] == [0.9, 0.1, 0.5]
    assert any(not torch.equal(snapshots[0][k], snapshots[2][k]) for k in snapshots[0])  # training moved them
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshots[0][name]), name
    assert not any(p.requires_grad for p in model.parameters())


def test_distillation_loss_by_hand():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    labels = torch.tensor([0, 1])
    temperature, weight = 2.0, 0.3
    ce = torch.nn.functional.cross_entropy(student, labels)
    p_t = torch.softmax(teacher / temperature, -1)
    log_p_s = torch.log_softmax(student / temperature, -1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum(-1).mean() * temperature**2
    got = adapt.distillation_loss(student, teacher, labels, weight, temperature)
    assert got.item() == pytest.approx((weight * kl + (1 - weight) * ce).item(), rel=1e-6)
    assert adapt.distillation_loss(student, teacher, labels, 0.0, temperature).item() == pytest.approx(ce.item())
    assert adapt.distillation_loss(student, student, labels, 1.0, temperature).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ConfigError, match="needs a teacher"):
        adapt.train(
            None, None, synthetic_task().train, None, metric="accuracy", config=adapt.TrainConfig("all", 1, distill=0.5)
        )


def test_hidden_distillation_loss_by_hand():
    teacher = [torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])]  # [B=1, T=3, H=2]; position 2 is padding
    student = [torch.tensor([[[1.0, 1.0], [0.0, 0.0], [-9.0, 0.0]]])]
    mask = torch.tensor([[1, 1, 0]])
    # real positions: squared error 1 + 4, teacher's squared norm 1 + 4
    assert adapt.hidden_distillation_loss(student, teacher, mask).item() == pytest.approx(1.0)
    two = adapt.hidden_distillation_loss([student[0], teacher[0]], [teacher[0], teacher[0]], mask)
    assert two.item() == pytest.approx(0.5)  # the mean over layers
    assert adapt.hidden_distillation_loss(teacher, teacher, mask).item() == 0.0
    with pytest.raises(ConfigError, match="the student gave 2, the teacher 1"):
        adapt.hidden_distillation_loss([student[0], student[0]], teacher, mask)
    with pytest.raises(ConfigError, match=r"hidden-state distillation weight 1\.0 needs a teacher"):
        adapt.train(
            None,
            None,
            synthetic_task().train,
            None,
            metric="accuracy",
            config=adapt.TrainConfig("all", 1, hidden_distill=1.0),
        )
    with pytest.raises(ConfigError, match="hidden-state distillation weight must be a finite number >= 0"):
        RecoverySpec(hidden_distill=-1.0)


def _toy_teacher(tiny_backbone, hf_tokenizer):
    """A tiny BERT task model in eval mode (the teacher of the recovery tests), its tokenizer and the toy splits."""
    data = synthetic_task("toy", n_train=64)
    loaded = LoadedModel(tiny_backbone("bert"), hf_tokenizer, "t", "c", None)
    teacher = stages.new_model(loaded, data, stages.AdaptSpec()).eval()
    splits = stages.Splits.of(data, stages.DataSpec(max_length=24))
    return teacher, fast_tokenizer(hf_tokenizer, 24), splits


def test_hidden_distillation_pulls_each_layer_towards_the_teacher(tiny_backbone, hf_tokenizer):
    """Recovery of a perturbed copy: with the hidden-state term its layer outputs end far closer to the
    teacher's than with logit distillation alone (which lets them drift), and no hook is left on either model."""
    teacher, tokenizer, splits = _toy_teacher(tiny_backbone, hf_tokenizer)
    generator = torch.Generator().manual_seed(0)
    perturbed = copy.deepcopy(teacher)
    with torch.no_grad():
        for layer in perturbed.spec.layer_list(perturbed.backbone):
            down = perturbed.spec.down_linear(layer).weight
            down.add_(torch.randn(down.shape, generator=generator) * down.std() * 2)

    def layer_error(model) -> float:
        from doe_runtime.tokenization import encode_batch

        ids, mask = (torch.from_numpy(a) for a in encode_batch(tokenizer, splits.train.inputs[:32]))
        hooks = [adapt.LayerOutputs(m) for m in (model, teacher)]
        try:
            with torch.no_grad():
                for hook, m in zip(hooks, (model, teacher)):
                    hook.active = True
                    m.eval()(ids, mask)
            return adapt.hidden_distillation_loss(hooks[0].take(), hooks[1].take(), mask).item()
        finally:
            for hook in hooks:
                hook.close()

    errors, records = {}, {}
    for weight in (0.0, 5.0):
        student = copy.deepcopy(perturbed)
        spec = RecoverySpec(epochs=2, lr=1e-3, batch_size=8, hidden_distill=weight, select_on_dev=False)
        records[weight] = stages.recover(student, teacher, tokenizer, splits, spec, progress=False)
        errors[weight] = layer_error(student)
        for model in (student, teacher):
            assert not any(layer._forward_hooks for layer in model.spec.layer_list(model.backbone))
    assert records[5.0]["hidden_distill"] == 5.0 and records[0.0]["hidden_distill"] == 0.0
    assert errors[5.0] < 0.5 * errors[0.0], errors


def test_calibration_gathers_only_what_the_scorer_needs(tiny_backbone, hf_tokenizer):
    data = synthetic_task("toy")
    model = stages.new_model(
        LoadedModel(tiny_backbone("bert"), hf_tokenizer, "t", "c", None), data, stages.AdaptSpec()
    ).eval()
    tokenizer = fast_tokenizer(hf_tokenizer, 24)
    spec = stages.PruneSpec(calib_examples=16, batch_size=8)
    assert spec.needs() == ("ag_mean",)
    assert stages.PruneSpec(fold_bias=True).needs() == ("ag_mean", "act")
    assert stages.PruneSpec(layer_types="both").needs() == ("ag_mean", "head_ag_mean")
    assert stages.PruneSpec(scorer="magnitude").needs() == ()
    stats = stages.calibration_stats(model, tokenizer, data.train, spec, progress=False)
    assert stats.gathered == ("ag_mean",) and stats.taylor is None and stats.act is None
    assert all(p.grad is None for p in model.parameters())  # no weight-gradient (Taylor) pass
    with pytest.raises(ValueError, match=r"scorer 'taylor' needs calibration statistics \['taylor'\]"):
        scorers.make_scorer("taylor").score(model, stats)
    full = stages.calibration_stats(model, tokenizer, data.train, spec, progress=False, needs=attribution.STATS)
    for name in ("ag_mean",):
        for a, b in zip(getattr(stats, name), getattr(full, name)):
            assert torch.allclose(a, b)
    assert (
        stages.calibration_stats(model, tokenizer, data.train, stages.PruneSpec(scorer="random"), progress=False)
        is None
    )


def test_splits_cap_the_reporting_split_by_a_stratified_sample():
    from doe_export.tasks import Split

    split = Split("sorted file", [f"t{i}" for i in range(100)], [0] * 60 + [1] * 30 + [2] * 10)
    sample = split.sample(20, seed=3)
    assert len(sample) == 20 and [sample.labels.count(k) for k in (0, 1, 2)] == [12, 6, 2]
    assert sample.inputs == sorted(sample.inputs, key=lambda t: int(t[1:]))  # the file's order kept
    assert sample.labels == split.sample(20, seed=3).labels and "stratified sample of 20" in sample.name
    assert split.head(20).labels == [0] * 20  # what the old cap did: classes 1 and 2 gone
    assert split.sample(None, 0) is split and split.sample(500, 0) is split


def test_rate_search_bisects_on_dev_and_reports_every_try(tiny_backbone, hf_tokenizer, monkeypatch):
    from doe_export import evaluate
    from doe_export.tasks import Split

    data = synthetic_task("toy")
    dense = stages.new_model(LoadedModel(tiny_backbone("bert"), hf_tokenizer, "t", "c", None), data, stages.AdaptSpec())
    splits = stages.Splits.of(data, stages.DataSpec(max_length=24))
    labels = [i % 2 for i in range(20)]
    splits = stages.Splits(
        splits.train, Split("dev of 20", [f"text {i}" for i in range(20)], labels), splits.test, "accuracy"
    )
    dense_preds = [1 - y if i < 2 else y for i, y in enumerate(labels)]  # 0.90 on dev
    tokenizer = fast_tokenizer(hf_tokenizer, 24)
    calls = []

    def fake_expert(dense_, tokenizer_, data_, prune_spec, recovery_spec, **options):
        calls.append(prune_spec.rate)
        dev = 0.90 - 0.1 * prune_spec.rate  # the metric falls with the rate: p=0.5 loses 5 points
        flips = round((0.90 - dev) * 20)  # answers of the dense model this expert changes (to wrong ones)
        preds = tuple(1 - y if 2 <= i < 2 + flips else p for i, (y, p) in enumerate(zip(labels, dense_preds)))
        before = stages.Score("accuracy", dev - 0.01, dev)
        after = stages.Score("accuracy", dev - 0.02, dev, dev_preds=preds)
        return stages.ExpertResult("model", None, {}, {}, before, after)

    monkeypatch.setattr(rate_search, "make_expert", fake_expert)
    monkeypatch.setattr(evaluate, "torch_predictions", lambda *args, **kwargs: dense_preds)  # the dense model on dev

    def search(max_loss, rule="point"):
        return rate_search.search_rate(
            dense,
            tokenizer,
            splits,
            stages.PruneSpec(calib_examples=16),
            stages.RecoverySpec(),
            max_loss=max_loss,
            rule=rule,
            progress=False,
        )

    found = search(5.0)
    assert found.rate == 0.5 and (found.expert.after.test, found.expert.after.dev) == (0.83, 0.85)
    assert calls == [0.5, 0.8, 0.65]  # bisection over 0.2 .. 0.9: 3 tries, not 6
    assert found.record["dense_dev"] == 0.90 and [t["rate"] for t in found.record["tried"]] == [0.5, 0.65, 0.8]
    assert found.record["chosen_rate"] == 0.5 and found.record["split"] == splits.dev.name
    assert found.record["dev_items"] == 20
    chosen = next(t for t in found.record["tried"] if t["rate"] == 0.5)
    # p=0.5 changes 1 of the 20 dense answers to a wrong one: -5 points, paired interval around it
    assert chosen["disagreement"] == 0.05 and chosen["vs_dense"]["value"] == pytest.approx(-0.05)
    assert chosen["vs_dense"]["low"] <= -0.05 <= chosen["vs_dense"]["high"] <= 0
    assert chosen["vs_dense"]["within"]["points"] == 5.0
    assert "over the dev items" in chosen["vs_dense"]["method"]  # the record says which items it resampled
    assert found.record["rule"] == "point"
    # 20 dev items cannot resolve 5 points: the record and the log say how wide the intervals came out against
    # the half-budget the split was sized for, what the experts changed, and the dev size that would do
    width = found.record["interval_width"]
    assert width["planned_points"] == 2.5 and width["measured_points"] > 2.5
    assert width["measured_disagreement"] == [0.05, 0.1] and width["assumed_disagreement"] == 0.03
    assert width["dev_items_to_resolve"] == math.ceil(20 * (width["measured_points"] / 2.5) ** 2) > 20
    with pytest.raises(
        ConfigError, match=r"no pruning rate kept the dev accuracy within 1 points .*p=0.2: 0.8800"
    ) as no:
        search(1.0)
    assert re.search(r"not the ±0.50 the dev split was sized for.* dev items would resolve 1 ", str(no.value))
    with pytest.raises(ConfigError, match=r"within 0 points") as refused:  # no width planned: none compared
        search(0.0)
    assert "sized for" not in str(refused.value)
    # the default rule asks the interval too: p=0.5's estimate is within 5 points but its interval (20 items) is
    # not, p=0.35 changes one answer (interval far below -5), p=0.2 changes none
    calls.clear()
    confident = search(5.0, rule="confident")
    assert confident.rate == 0.2 and calls == [0.5, 0.2, 0.35] and confident.record["rule"] == "confident"
    assert confident.record["chosen_rate"] == 0.2
    with pytest.raises(ConfigError, match="--budget-rule must be one of confident, point, got 'maybe'"):
        search(5.0, rule="maybe")
    with pytest.raises(ConfigError, match="--max-loss must be >= 0"):
        search(-1.0)


def test_build_with_max_loss_records_the_search(tiny_backbone, hf_tokenizer, tmp_path):
    from doe_export.pipeline import build_task
    from doe_runtime import read_manifest

    config = BuildConfig(
        out_dir=str(tmp_path),
        data=DataSpec(max_length=24),
        adapt=AdaptSpec(epochs=1, batch_size=8),
        prune=PruneSpec(calib_examples=16, batch_size=8),
        recovery=RecoverySpec(batch_size=8),
        export=ExportSpec(fp16=False, int8=False),
        progress=False,
        max_loss=100.0,
        search_rates=(0.3, 0.6),
    )
    loaded = LoadedModel(tiny_backbone("bert"), hf_tokenizer, "tiny-bert", "config", None)
    result = build_task(config, loaded, synthetic_task("toy"))
    manifest = read_manifest(tmp_path / "toy")
    search = manifest.pruning["search"]
    assert search["chosen_rate"] == 0.6 and search["max_loss_points"] == 100.0 and search["candidates"] == [0.3, 0.6]
    assert manifest.pruning["rate"] == 0.6 and result.rate == 0.6 and result.ffn_widths == [15, 15]  # round(37 * .4)
    assert result.bound_128 > 1.0


def test_train_budget_sizes_the_training_split_or_refuses_before_training(tiny_backbone, hf_tokenizer, monkeypatch):
    from doe_export import adapt
    from doe_export.pipeline import plan_training

    def budget(minutes, epochs=3, max_train=None):
        return BuildConfig(
            train_budget=minutes,
            data=DataSpec(max_train=max_train),
            adapt=AdaptSpec(epochs=epochs),
            prune=PruneSpec(calib_examples=16),
        )

    loaded = LoadedModel(tiny_backbone("bert"), hf_tokenizer, "tiny-bert", "config", None)
    data = synthetic_task("toy", n_train=400)
    monkeypatch.setattr(adapt, "examples_per_second", lambda *args, **kwargs: 2.0)
    monkeypatch.setattr(adapt, "train", lambda *a, **k: pytest.fail("nothing may train while planning"))
    planned = plan_training(budget(1.0), loaded, data)
    assert planned.data.max_train == 40  # 1 min x 2 examples/s / 3 epochs
    capped = plan_training(budget(60.0, epochs=1), loaded, data)
    assert capped.data.max_train == len(data.train)  # the whole split fits
    with pytest.raises(ConfigError, match=r"fits 4 training examples per epoch \(2.0 examples/s .*fewer than the 16"):
        plan_training(budget(0.1, max_train=2000), loaded, data)
    assert plan_training(BuildConfig(), loaded, data) == BuildConfig()  # no budget: untouched


def test_max_loss_sizes_the_dev_split_from_train_or_refuses_before_training(capsys):
    from doe_export.pipeline import plan_dev
    from doe_export.tasks import Split, TaskData
    from doe_export.uncertainty import dev_items_for, resolvable_points

    def task(train: int, dev: int) -> TaskData:
        split = lambda name, n: Split(name, [f"{name} {i}" for i in range(n)], [i % 2 for i in range(n)])  # noqa: E731
        return TaskData(
            "t",
            "single",
            ["a", "b"],
            "accuracy",
            split("train", train),
            split("dev", dev),
            split("test", 50),
            "generated",
        )

    needed = dev_items_for(1.0)
    assert needed == 4610 and dev_items_for(2.0) == 1153 and resolvable_points(needed) <= 1.0
    config, data = plan_dev(BuildConfig(max_loss=1.0), task(8000, 100))
    assert len(data.dev) == config.data.max_dev == needed and len(data.train) == 8000 - (needed - 100)
    assert (
        data.dev.inputs[:100] == [f"dev {i}" for i in range(100)] and data.dev.inputs[100] == f"train {len(data.train)}"
    )
    assert not set(data.dev.inputs) & set(data.train.inputs) and "carved from the end of train" in data.dev.name
    untouched = task(100, 5000)
    assert plan_dev(BuildConfig(max_loss=1.0), untouched)[1].dev is untouched.dev  # big enough already
    assert plan_dev(BuildConfig(), untouched) == (BuildConfig(), untouched)  # no budget: nothing changes
    with pytest.raises(
        ConfigError, match=r"needs a dev split of 4,610 items .* smallest budget its data resolve is 2\.0 points"
    ):
        plan_dev(BuildConfig(max_loss=1.0), task(1529, 170))
    with pytest.raises(ConfigError, match="--max-loss 0 cannot be resolved"):
        plan_dev(BuildConfig(max_loss=0.0), task(8000, 100))
    mcc = replace(task(8000, 100), metric="matthews")
    config, data = plan_dev(BuildConfig(max_loss=2.0), mcc)
    assert len(data.dev) == config.data.max_dev > 3 * dev_items_for(2.0)  # MCC moves more per changed answer
    with pytest.raises(ConfigError, match=r"point\(s\) of matthews .*matthews needs 4\.\dx the items accuracy would"):
        plan_dev(BuildConfig(max_loss=1.0), mcc)
    from doe_export.cli import main

    assert main(["build", "--tasks", "bbc-news", "--max-loss", "1", "--out", "/nonexistent/never"]) == 2
    assert "needs a dev split of 4,610 items" in capsys.readouterr().err


def test_gradual_pruning_reaches_the_one_shot_widths_in_steps(tiny_backbone, hf_tokenizer, monkeypatch):
    """--prune-steps 2: two attribute / prune / recover rounds ending at the one-shot widths (37 -> 28 -> 18),
    each step attributed on the model the step before left; refused where it cannot apply."""
    data = synthetic_task("toy", n_train=64)
    loaded = LoadedModel(tiny_backbone("bert"), hf_tokenizer, "t", "c", None)
    dense = stages.new_model(loaded, data, stages.AdaptSpec()).eval()
    tokenizer = fast_tokenizer(hf_tokenizer, 24)
    splits = stages.Splits.of(data, DataSpec(max_train=48, max_dev=8, max_length=24))
    recovery = RecoverySpec(epochs=1, batch_size=8)
    one_shot = stages.make_expert(
        dense, tokenizer, splits, PruneSpec(rate=0.5, calib_examples=16, batch_size=8), recovery, progress=False
    )
    attributed, recovered = [], []
    original_attribute, original_recover = stages.attribute, stages.recover
    monkeypatch.setattr(
        stages,
        "attribute",
        lambda model, *a, **k: attributed.append(model.ffn_widths()) or original_attribute(model, *a, **k),
    )
    monkeypatch.setattr(
        stages,
        "recover",
        lambda model, *a, **k: recovered.append(model.ffn_widths()) or original_recover(model, *a, **k),
    )
    spec = PruneSpec(rate=0.5, calib_examples=16, batch_size=8, steps=2)
    gradual = stages.make_expert(dense, tokenizer, splits, spec, recovery, progress=False)
    assert one_shot.report["ffn_widths"] == gradual.report["ffn_widths"] == [18, 18]
    assert attributed == [[37, 37], [28, 28]] and recovered == [[28, 28], [18, 18]]
    assert gradual.report["params_before"] == one_shot.report["params_before"]
    assert gradual.report["ffn_widths_before"] == one_shot.report["ffn_widths_before"] == [37, 37]  # the dense
    from doe_export.flops import report_bound

    assert report_bound(32, gradual.report, 128) == report_bound(32, one_shot.report, 128)  # same widths, same bound
    assert [s["rate"] for s in gradual.report["steps"]] == [round(1 - 28 / 37, 6), round(1 - 18 / 28, 6)]
    assert gradual.report["alignment"] == one_shot.report["alignment"]
    assert dense.ffn_widths() == [37, 37]  # the dense model is untouched
    with pytest.raises(ConfigError, match="gradual pruning removes FFN neurons with a per-layer budget only"):
        PruneSpec(steps=2, budget="global")
    with pytest.raises(ConfigError, match="pruning steps must be an integer >= 1, got 0"):
        PruneSpec(steps=0)


def test_intermediate_training_moves_the_shared_backbone_and_leaves_the_task_head(
    tiny_backbone, hf_tokenizer, monkeypatch
):
    """The backbone learns the intermediate task through a helper with its own head (3 labels here); the task
    model's head (2 labels) is not touched, and the record says what was trained on what."""
    import doe_export.tasks as tasks_module

    inter = synthetic_task("inter", kind="pair", n_train=40, seed=3)
    inter = replace(inter, labels=["a", "b", "c"])
    asked = []
    monkeypatch.setattr(tasks_module, "load_task", lambda name, *a, **k: asked.append(name) or inter)
    data = synthetic_task("toy")
    spec = stages.AdaptSpec(epochs=1, intermediate="inter", intermediate_examples=32)
    model = stages.new_model(LoadedModel(tiny_backbone("bert"), hf_tokenizer, "t", "c", None), data, spec)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    tokenizer = fast_tokenizer(hf_tokenizer, 24)
    record = stages.intermediate(
        model,
        LoadedModel(model.backbone, hf_tokenizer, "t", "c", None),
        tokenizer,
        spec,
        stages.DataSpec(max_dev=8),
        progress=False,
    )
    assert asked == ["inter"]
    assert record["task"] == "inter" and record["labels"] == ["a", "b", "c"] and record["examples"] == 32
    assert len(record["epoch_loss"]) == 1 and record["params"] == "all"
    after = model.backbone.state_dict()
    assert any(not torch.equal(backbone[k], after[k]) for k in backbone)  # the backbone learned
    assert head and all(torch.equal(v, model.state_dict()[k]) for k, v in head.items())  # the task's head did not


def test_intermediate_spec_is_checked_and_keeps_old_cache_keys():
    assert stages.spec_key(stages.AdaptSpec()) == stages.spec_key(stages.AdaptSpec(intermediate_examples=10_000))
    assert stages.spec_key(stages.AdaptSpec()) != stages.spec_key(stages.AdaptSpec(intermediate="snli"))
    with pytest.raises(ConfigError, match="prompt tuning keeps frozen; use it with --adapt finetune"):
        stages.AdaptSpec(mode="prompt", intermediate="snli")
    with pytest.raises(ConfigError, match="--intermediate-examples must be an integer >= 1, got 0"):
        stages.AdaptSpec(intermediate="snli", intermediate_examples=0)
    with pytest.raises(ConfigError, match="--intermediate-epochs must be an integer >= 1"):
        stages.AdaptSpec(intermediate="snli", intermediate_epochs=0)


def test_perturbed_copies_change_words_and_are_seeded():
    """Each copy changes at least one word of every text of two or more words (pair inputs: both texts),
    draws its replacements from the split's own words, and the same seed gives the same copies."""
    import random

    from doe_export import augment
    from doe_export.tasks import Split

    split = Split(
        "toy",
        ["the cat sat on the mat", "a dog ran far away today", "one", ("who is he", "he is a tall man")],
        [0, 1, 0, 1],
    )
    first = augment.augmented_inputs(split, 3, seed=7)
    assert first == augment.augmented_inputs(split, 3, seed=7) != augment.augmented_inputs(split, 3, seed=8)
    assert len(first) == 12 and first[2::4] == ["one"] * 3  # copy after copy; a one-word text stays
    vocabulary = {
        w for item in split.inputs for text in (item if isinstance(item, tuple) else (item,)) for w in text.split()
    }
    for copy_index in range(3):
        for original, changed in zip(split.inputs, first[4 * copy_index : 4 * copy_index + 4]):
            if original == "one":
                continue
            pairs = zip(original, changed) if isinstance(original, tuple) else [(original, changed)]
            for text, new in pairs:
                assert new != text and set(new.split()) <= vocabulary, (text, new)
    assert augment.perturb("a b c d e f g h i j", random.Random(0), ["z"], share=1.0) != "a b c d e f g h i j"
    with pytest.raises(ConfigError, match="augmented copies must be an integer >= 0, got -1"):
        augment.augmented_inputs(split, -1, seed=0)
    with pytest.raises(ConfigError, match="share of words changed must be in"):
        augment.augmented_inputs(split, 1, seed=0, share=0.0)


def test_recovery_with_augmented_copies_trains_on_them_labelled_by_the_teacher(tiny_backbone, hf_tokenizer):
    """``RecoverySpec.augment``: recovery trains on the split plus its copies, whose labels are the teacher's
    answers (not the gold ones), and it refuses to run without a teacher to label them."""
    teacher, tokenizer, splits = _toy_teacher(tiny_backbone, hf_tokenizer)
    train = splits.train.head(16)
    augmented, copied = stages.augmented_split(train, teacher, tokenizer, 2, seed=3)
    logits = stages.evaluate.torch_logits(teacher, tokenizer, augmented.inputs[16:])
    assert len(augmented) == 48 and augmented.inputs[:16] == train.inputs and augmented.labels[:16] == train.labels
    assert augmented.labels[16:] == logits.argmax(1).tolist() and copied.shape == (32, teacher.num_labels)
    np.testing.assert_allclose(copied, logits, atol=1e-5)
    assert "2 perturbed copies labelled by the dense model" in augmented.name
    spec = RecoverySpec(epochs=1, lr=1e-3, batch_size=8, augment=2, max_examples=16, select_on_dev=False)
    record = stages.recover(copy.deepcopy(teacher), teacher, tokenizer, splits, spec, progress=False)
    assert record["examples"] == 48 and record["augment"] == 2
    plain = stages.recover(copy.deepcopy(teacher), teacher, tokenizer, splits, replace(spec, augment=0), progress=False)
    assert plain["examples"] == 16 and "augment" not in plain
    with pytest.raises(ConfigError, match="labels them with the dense model's answers, and no dense model was given"):
        stages.recover(copy.deepcopy(teacher), None, tokenizer, splits, spec, progress=False)
    with pytest.raises(ConfigError, match=r"recovery augment \(perturbed copies of each training text\) must be"):
        RecoverySpec(augment=-1)


def test_recovery_with_extra_examples_trains_on_the_items_past_the_adaptations(tiny_backbone, hf_tokenizer):
    """``RecoverySpec.extra_examples``: the training items ``max_train`` leaves out (``Splits.spare``) join
    recovery with their gold labels, fewer where fewer are left; with none left the option is refused."""
    data = synthetic_task("toy", n_train=64)
    splits = stages.Splits.of(data, stages.DataSpec(max_train=40, max_length=24))
    assert (len(splits.train), len(splits.spare)) == (40, 24)
    assert [*splits.train.inputs, *splits.spare.inputs] == data.train.inputs  # the rest of train, nothing twice
    assert len(stages.Splits.of(data, stages.DataSpec(max_train=None)).spare) == 0

    extended = stages.with_extra(splits.train.head(16), splits.spare, 10)
    assert extended.inputs == [*data.train.inputs[:16], *data.train.inputs[40:50]]
    assert extended.labels == [*data.train.labels[:16], *data.train.labels[40:50]]
    assert "+ 10 more" in extended.name

    teacher, tokenizer, _ = _toy_teacher(tiny_backbone, hf_tokenizer)
    spec = RecoverySpec(epochs=1, lr=1e-3, batch_size=8, extra_examples=10, max_examples=16, select_on_dev=False)
    record = stages.recover(copy.deepcopy(teacher), teacher, tokenizer, splits, spec, progress=False)
    assert record["examples"] == 26 and record["extra_examples"] == 10
    more = stages.recover(
        copy.deepcopy(teacher), teacher, tokenizer, splits, replace(spec, extra_examples=100), progress=False
    )
    assert more["examples"] == 40 and more["extra_examples"] == 24  # all 24 left, not 100
    plain = stages.recover(
        copy.deepcopy(teacher), teacher, tokenizer, splits, replace(spec, extra_examples=0), progress=False
    )
    assert plain["examples"] == 16 and "extra_examples" not in plain
    both = stages.recover(copy.deepcopy(teacher), teacher, tokenizer, splits, replace(spec, augment=1), progress=False)
    assert both["examples"] == 52 and both["extra_examples"] == 10  # the extra items get copies too
    whole = stages.Splits.of(data, stages.DataSpec(max_train=None, max_length=24))
    with pytest.raises(
        ConfigError, match=r"training items past the adaptation's, and the training split has none left"
    ):
        stages.recover(copy.deepcopy(teacher), teacher, tokenizer, whole, spec, progress=False)
    with pytest.raises(ConfigError, match=r"recovery extra_examples \(training items past the adaptation's\) must be"):
        RecoverySpec(extra_examples=-1)


def test_extra_items_labelled_dense_train_on_the_teachers_answers(tiny_backbone, hf_tokenizer, monkeypatch):
    """``extra_labels="dense"``: the extra items train on the teacher's answers, not their own labels (which
    are never read), the adaptation's items keep theirs, and the teacher runs once over all of them; without a
    teacher the option is refused."""
    teacher, tokenizer, _ = _toy_teacher(tiny_backbone, hf_tokenizer)
    data = synthetic_task("toy", n_train=64)
    splits = stages.Splits.of(data, stages.DataSpec(max_train=40, max_length=24))
    trained: list = []
    real_train = stages.adapt_loop.train
    monkeypatch.setattr(
        stages.adapt_loop,
        "train",
        lambda model, tok, train, *a, **k: trained.append((train, k)) or real_train(model, tok, train, *a, **k),
    )
    spec = RecoverySpec(epochs=1, lr=1e-3, batch_size=8, extra_examples=24, max_examples=16, select_on_dev=False)
    rows: list[int] = []
    student = copy.deepcopy(teacher)
    hook = teacher.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        record = stages.recover(
            student, teacher, tokenizer, splits, replace(spec, extra_labels="dense"), progress=False
        )
    finally:
        hook.remove()
    assert sum(rows) == 40, rows  # 16 + 24 items, once: their logits label the extra items and feed distillation
    (split, kwargs), answers = trained[-1], stages.evaluate.torch_logits(teacher, tokenizer, splits.spare.inputs[:24])
    assert record["extra_labels"] == "dense" and record["extra_examples"] == 24
    assert split.labels[:16] == splits.train.labels[:16] and split.labels[16:] == answers.argmax(1).tolist()
    assert kwargs["teacher_logits"].shape == (40, teacher.num_labels)
    np.testing.assert_allclose(kwargs["teacher_logits"][16:], answers, atol=1e-5)
    assert split.labels[16:] != splits.spare.labels[:24]  # the toy teacher is untrained: its answers differ

    gold = stages.recover(copy.deepcopy(teacher), teacher, tokenizer, splits, spec, progress=False)
    assert gold["extra_labels"] == "gold" and trained[-1][0].labels == [
        *splits.train.labels[:16],
        *splits.spare.labels[:24],
    ]
    with pytest.raises(ConfigError, match=r"with 24 extra items labelled 'dense' labels them with the dense model"):
        stages.recover(
            copy.deepcopy(teacher), None, tokenizer, splits, replace(spec, extra_labels="dense"), progress=False
        )
    with pytest.raises(ConfigError, match="recovery extra labels must be one of gold, dense, got 'teacher'"):
        RecoverySpec(extra_labels="teacher")


def test_extra_texts_of_another_task_train_on_the_teachers_answers(tiny_backbone, hf_tokenizer, monkeypatch):
    """``extra_from``: another task's training texts, shaped like this task's inputs, join recovery labelled
    by the teacher (the other task's labels name other classes and are never read); the record names the
    source. A task with other-shaped inputs, the task itself, or the gold labels are refused."""
    teacher, tokenizer, _ = _toy_teacher(tiny_backbone, hf_tokenizer)
    data = synthetic_task("toy", n_train=64)
    other = synthetic_task("other", n_train=30, seed=5)
    extra = stages.extra_texts(other, data)
    assert extra.inputs == other.train.inputs and extra.name == "other's training texts"
    splits = replace(stages.Splits.of(data, stages.DataSpec(max_train=40, max_length=24)), spare=extra)
    trained: list = []
    real_train = stages.adapt_loop.train
    monkeypatch.setattr(
        stages.adapt_loop,
        "train",
        lambda model, tok, train, *a, **k: trained.append(train) or real_train(model, tok, train, *a, **k),
    )
    spec = RecoverySpec(
        epochs=1,
        lr=1e-3,
        batch_size=8,
        extra_examples=100,
        extra_labels="dense",
        extra_from="other",
        max_examples=16,
        select_on_dev=False,
    )
    record = stages.recover(copy.deepcopy(teacher), teacher, tokenizer, splits, spec, progress=False)
    answers = stages.evaluate.torch_logits(teacher, tokenizer, other.train.inputs).argmax(1).tolist()
    assert (record["examples"], record["extra_examples"], record["extra_from"]) == (46, 30, "other")
    assert trained[-1].inputs[16:] == other.train.inputs and trained[-1].labels[16:] == answers
    assert trained[-1].labels[:16] == splits.train.labels[:16]

    with pytest.raises(ConfigError, match=r"task 'toy' reads single inputs and --recovery-extra-from pairs gives pair"):
        stages.extra_texts(synthetic_task("pairs", kind="pair"), data)
    with pytest.raises(ConfigError, match=r"--recovery-extra-from toy names the task itself"):
        stages.extra_texts(synthetic_task("toy", seed=2), data)
    with pytest.raises(ConfigError, match=r"that task's labels are not this task's.*use --recovery-extra-labels dense"):
        RecoverySpec(extra_examples=10, extra_from="snli")
    with pytest.raises(ConfigError, match=r"--recovery-extra asks for none: set --recovery-extra N"):
        RecoverySpec(extra_labels="dense", extra_from="snli")
    with pytest.raises(TaskNameError, match=r"invalid task name 'Bad Name'"):
        RecoverySpec(extra_examples=10, extra_labels="dense", extra_from="Bad Name")


def test_augmented_recovery_runs_the_teacher_once_per_text(tiny_backbone, hf_tokenizer):
    """The copies' logits that label them are the ones distillation uses: with 16 texts and 2 copies the
    teacher sees 48 rows in all (not 32 to label the copies, then 48 again), and training on logits passed in
    ends where training that computes them ends."""
    teacher, tokenizer, splits = _toy_teacher(tiny_backbone, hf_tokenizer)
    student, rows = copy.deepcopy(teacher), []  # copied before the hook, which deepcopy would carry along
    hook = teacher.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    spec = RecoverySpec(epochs=1, lr=1e-3, batch_size=8, augment=2, max_examples=16, select_on_dev=False)
    try:
        stages.recover(student, teacher, tokenizer, splits, spec, progress=False)
    finally:
        hook.remove()
    assert sum(rows) == 48, rows

    train = splits.train.head(16)
    config = adapt.TrainConfig("all", 1, 1e-3, 8, 0, distill=0.5)

    def fit(logits=None):
        model = copy.deepcopy(teacher)
        adapt.train(
            model,
            tokenizer,
            train,
            None,
            metric="accuracy",
            config=config,
            progress=False,
            teacher=teacher,
            teacher_logits=logits,
        )
        return model.state_dict()

    logits = stages.evaluate.torch_logits(teacher, tokenizer, train.inputs)
    computed, given = fit(), fit(logits)
    for name, value in computed.items():
        assert torch.equal(value, given[name]), name
    other = fit(-10 * logits)  # other logits given, other weights: the ones passed in are the ones used
    assert any(not torch.equal(value, other[name]) for name, value in computed.items())
    with pytest.raises(
        ConfigError, match=rf"must have one row per training example .* got \(15, {teacher.num_labels}\)"
    ):
        fit(logits[:15])
