"""Pruning is exact (equals zeroing the removed neurons), budgets count right, and the DoE
score equals activation x gradient computed by hand."""

import pytest
import torch

from doe_export import attribution, prune, scorers
from doe_export.loading import fast_tokenizer
from doe_export.taskmodel import TaskModel
from doe_export.tasks import synthetic_task


def _model(tiny_backbone, family="bert", prompt=3):
    torch.manual_seed(1)
    return TaskModel(tiny_backbone(family), num_labels=2, prompt_length=prompt).eval()


@pytest.mark.parametrize("family", ["bert", "distilbert", "llama"])
def test_physical_pruning_equals_masking(family, tiny_backbone, masked_forward):
    model = _model(tiny_backbone, family)
    ids = torch.tensor([[101, 2204, 3185, 2003, 102, 0], [101, 6659, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    generator = torch.Generator().manual_seed(3)
    scores = [torch.rand(37, generator=generator) for _ in range(2)]
    keep = prune.select_neurons(scores, prune.PruneConfig(rate=0.5))
    expected = masked_forward(model, "ffn", keep, ids, mask)
    dense = model(ids, mask).detach()
    prune.prune_ffn(model, keep)
    with torch.no_grad():
        got = model(ids, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dense, got, atol=1e-4)  # pruning did change the function


def test_fold_bias_equals_mean_replacement(tiny_backbone, masked_forward):
    model = _model(tiny_backbone)
    ids = torch.tensor([[101, 2204, 3185, 102]])
    mask = torch.ones_like(ids)
    generator = torch.Generator().manual_seed(4)
    scores = [torch.rand(37, generator=generator) for _ in range(2)]
    means = [torch.rand(37, generator=generator) for _ in range(2)]
    keep = prune.select_neurons(scores, prune.PruneConfig(rate=0.7))
    expected = masked_forward(model, "ffn", keep, ids, mask, replace=means)
    prune.prune_ffn(model, keep, mean_activation=means)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), expected, atol=1e-5, rtol=1e-5)


def test_budgets_and_rounding():
    scores = [torch.arange(100, dtype=torch.float32), torch.arange(100, dtype=torch.float32) + 1000]
    keep = prune.select_neurons(scores, prune.PruneConfig(rate=0.65))
    assert [len(k) for k in keep] == [35, 35]
    assert keep[0].tolist() == list(range(65, 100))  # the highest scores survive
    rounded = prune.select_neurons(scores, prune.PruneConfig(rate=0.65, round_to=8))
    assert [len(k) for k in rounded] == [40, 40]
    glob = prune.select_neurons(scores, prune.PruneConfig(rate=0.5, budget="global"))
    assert [len(k) for k in glob] == [1, 100]  # min_keep keeps one neuron in the low layer
    with pytest.raises(ValueError, match="pruning rate"):
        prune.select_neurons(scores, prune.PruneConfig(rate=1.0))
    with pytest.raises(ValueError, match="budget"):
        prune.select_neurons(scores, prune.PruneConfig(budget="nope"))


def test_selection_is_deterministic_with_ties():
    scores = [torch.ones(10)]
    first = prune.select_neurons(scores, prune.PruneConfig(rate=0.5))
    assert first[0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("agg", ["mean", "max"])
def test_doe_score_matches_hand_computation(agg, tiny_backbone, hf_tokenizer):
    model = _model(tiny_backbone)
    tokenizer = fast_tokenizer(hf_tokenizer, 16)
    data = synthetic_task(n_train=6)
    batches = list(attribution.calibration_batches(tokenizer, data.train, 6, 3, seed=0))
    stats = attribution.collect_stats(model, batches, progress=False)
    scores = scorers.DoEScorer(agg).score(model, stats)

    # by hand: one example at a time, retain_grad on the down-projection inputs
    totals = [torch.zeros(37, dtype=torch.float64) for _ in range(2)]
    for ids, mask, labels in batches:
        for row in range(ids.shape[0]):
            length = int(mask[row].sum())
            one_ids, one_mask = ids[row : row + 1, :length], mask[row : row + 1, :length]
            acts = []
            handles = [
                model.spec.down_linear(layer).register_forward_pre_hook(
                    lambda m, a, acts=acts: acts.append(a[0]) or a[0].retain_grad()
                )
                for layer in model.spec.layer_list(model.backbone)
            ]
            model.prompt.requires_grad_(True)
            logp = torch.log_softmax(model(one_ids, one_mask), -1)[0, labels[row]]
            logp.backward()
            model.prompt.requires_grad_(False)
            for handle in handles:
                handle.remove()
            for index, act in enumerate(acts):
                product = (act * act.grad)[0].double()  # [P+T, I], no padding here
                totals[index] += product.mean(0) if agg == "mean" else product.max(0).values
    for index in range(2):
        torch.testing.assert_close(scores.importance[index].double(), (totals[index] / 6).abs(), atol=1e-5, rtol=1e-4)
    assert scores.examples == 6


def test_calibration_larger_than_split_is_refused(hf_tokenizer):
    tokenizer = fast_tokenizer(hf_tokenizer, 16)
    data = synthetic_task(n_train=10)
    with pytest.raises(ValueError, match="calibration needs 20 examples"):
        list(attribution.calibration_batches(tokenizer, data.train, 20, 4, 0))


def _stats(model, hf_tokenizer, n=12):
    tokenizer = fast_tokenizer(hf_tokenizer, 16)
    data = synthetic_task(n_train=n)
    return attribution.collect_stats(
        model, attribution.calibration_batches(tokenizer, data.train, n, 4, 0), progress=False
    )


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_dead_neuron_scores_zero_for_every_data_and_weight_scorer(family, tiny_backbone, hf_tokenizer):
    """A neuron with zero weights in and out contributes nothing: every principled score is 0 for it."""
    model = _model(tiny_backbone, family)
    layer = model.spec.layer_list(model.backbone)[1]
    with torch.no_grad():
        for linear in model.spec.up_linears(layer):
            linear.weight[5].zero_()
            if linear.bias is not None:
                linear.bias[5] = 0.0
        model.spec.down_linear(layer).weight[:, 5].zero_()
    flags = [p.requires_grad for p in model.parameters()]
    stats = _stats(model, hf_tokenizer)
    assert [p.requires_grad for p in model.parameters()] == flags  # collect_stats restores what it changed
    assert all(p.grad is None for p in model.backbone.parameters())
    for name in ("doe", "activation", "gradient", "magnitude", "taylor"):
        importance = scorers.make_scorer(name).score(model, stats).importance
        assert float(importance[1][5]) == pytest.approx(0.0, abs=1e-12), name
        assert float(importance[1].max()) > 0, name
        assert [len(t) for t in importance] == [37, 37]


def test_random_scorer_is_seeded_and_data_free(tiny_backbone):
    model = _model(tiny_backbone)
    a = scorers.make_scorer("random", seed=1).score(model, None).importance
    b = scorers.make_scorer("random", seed=1).score(model, None).importance
    c = scorers.make_scorer("random", seed=2).score(model, None).importance
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="needs calibration statistics"):
        scorers.make_scorer("taylor").score(model, None)


def test_skill_predictivity_by_hand(tiny_backbone, hf_tokenizer):
    model = _model(tiny_backbone)
    stats = _stats(model, hf_tokenizer)
    importance = scorers.make_scorer("skill").score(model, stats).importance
    acts = stats.prompt_act[0][:, 7]  # neuron 7 of layer 0, one value per example
    above = acts > acts.mean()
    labels = stats.labels.bool()
    accuracy = float((above == labels).float().mean())  # two classes: one-vs-rest is symmetric
    assert float(importance[0][7]) == pytest.approx(max(accuracy, 1 - accuracy))
    assert all(bool(((t >= 0.5) & (t <= 1.0)).all()) for t in importance)


def test_taylor_down_column_equals_activation_times_gradient(tiny_backbone, hf_tokenizer):
    """For the down-projection column of neuron i, sum_k |W_ki dL/dW_ki| is computable by hand."""
    model = _model(tiny_backbone)
    stats = _stats(model, hf_tokenizer, n=4)
    down = model.spec.down_linear(model.spec.layer_list(model.backbone)[0])
    up = model.spec.up_linears(model.spec.layer_list(model.backbone)[0])[0]
    tokenizer = fast_tokenizer(hf_tokenizer, 16)
    batches = list(attribution.calibration_batches(tokenizer, synthetic_task(n_train=4).train, 4, 4, 0))
    for p in (*up.parameters(), *down.parameters()):
        p.requires_grad_(True)
    loss = sum(-torch.log_softmax(model(ids, mask), -1).gather(1, y[:, None]).sum() for ids, mask, y in batches)
    loss.backward()
    expected = (
        (up.weight * up.weight.grad).abs().sum(1)
        + (up.bias * up.bias.grad).abs()
        + (down.weight * down.weight.grad).abs().sum(0)
    )
    torch.testing.assert_close(stats.taylor[0].float(), expected.detach(), atol=1e-6, rtol=1e-4)
