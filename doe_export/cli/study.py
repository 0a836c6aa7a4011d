"""``doe study``: the localization and recovery studies' flags (defaults read from StudyConfig's flow)."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError
from ..recovery_study import DEFAULT_TASKS as RECOVERY_TASKS
from ..specs import AdaptMode, ExtraLabels, TrainedParams
from ..study import ALL_ABLATIONS, StudyConfig
from .options import choices, default, names, numbers, positive_or_none, render_only, report_errors

# flag (argparse dest) -> (None: a field of StudyConfig, else the part of its default flow; field)
FIELDS: dict[str, tuple[str | None, str]] = {
    "rates": (None, "rates"),
    "methods": (None, "methods"),
    "seeds": (None, "seeds"),
    "random_seeds": (None, "random_seeds"),
    "adapt": ("adapt", "mode"),
    "prompt_length": ("adapt", "prompt_length"),
    "lr": ("adapt", "lr"),
    "epochs": ("adapt", "epochs"),
    "max_train": ("data", "max_train"),
    "max_eval": ("data", "max_eval"),
    "max_length": ("data", "max_length"),
    "recovery_params": ("recovery", "params"),
    "distill": ("recovery", "distill"),
    "hidden_distill": ("recovery", "hidden_distill"),
    "augment": ("recovery", "augment"),
    "recovery_extra": ("recovery", "extra_examples"),
    "recovery_extra_labels": ("recovery", "extra_labels"),
    "recovery_epochs": ("recovery", "epochs"),
    "recovery_examples": ("recovery", "max_examples"),
}


def _default(dest: str):
    part, name = FIELDS[dest]
    if part is None:
        return default(StudyConfig, name)
    value = getattr(getattr(StudyConfig().flow, part), name)
    return str(value) if isinstance(value, (AdaptMode, TrainedParams)) else value


def _add_flow_options(st: argparse.ArgumentParser) -> None:
    st.add_argument(
        "--adapt",
        choices=choices(AdaptMode),
        default=_default("adapt"),
        help="adaptation before attribution: prompt tuning (frozen backbone, the paper) or fine-tuning "
        "(backbone + head, and the soft prompt when --prompt-length > 0)",
    )
    st.add_argument(
        "--prompt-length",
        type=int,
        default=_default("prompt_length"),
        help="soft-prompt positions (0: none; finetune only)",
    )
    st.add_argument(
        "--recovery-params",
        choices=choices(TrainedParams),
        default=_default("recovery_params"),
        help="what recovery trains after each pruning: soft prompt + head (the first studies) or all",
    )
    st.add_argument(
        "--distill", type=float, default=_default("distill"), help="distillation weight in recovery (0: cross-entropy)"
    )
    st.add_argument(
        "--hidden-distill",
        type=float,
        default=_default("hidden_distill"),
        help="hidden-state distillation weight in recovery (each layer's output against the dense model's; 0: off)",
    )
    st.add_argument(
        "--augment",
        type=int,
        default=_default("augment"),
        metavar="COPIES",
        help="perturbed copies of each training text that recovery also distills on, labelled by the dense model "
        "(0: off)",
    )
    st.add_argument(
        "--recovery-extra",
        type=int,
        default=_default("recovery_extra"),
        metavar="N",
        help="training items past --max-train that recovery also trains on (0: off)",
    )
    st.add_argument(
        "--recovery-extra-labels",
        choices=choices(ExtraLabels),
        default=_default("recovery_extra_labels"),
        help="labels of the --recovery-extra items: the split's own (gold), or the dense model's answers (dense: "
        "the split's labels are not read, so unlabelled text would do)",
    )
    st.add_argument("--recovery-epochs", type=int, default=_default("recovery_epochs"))
    st.add_argument(
        "--lr", type=float, default=_default("lr"), help="adaptation learning rate (default 1e-2 prompt, 8e-5 finetune)"
    )
    st.add_argument("--epochs", type=int, default=_default("epochs"), help="adaptation epochs (best dev epoch kept)")
    st.add_argument(
        "--max-train",
        type=positive_or_none,
        default=_default("max_train"),
        help="adaptation examples per task (calibration samples come from these)",
    )
    st.add_argument(
        "--recovery-examples",
        type=positive_or_none,
        default=_default("recovery_examples"),
        help="recovery examples per run (default: the task's whole training split, as doe build)",
    )
    st.add_argument("--max-eval", type=int, default=_default("max_eval"), help="cap on the reporting split")
    st.add_argument("--max-length", type=int, default=_default("max_length"))


def add_parser(sub) -> argparse.ArgumentParser:
    st = sub.add_parser(
        "study",
        help="studies that write records + report + plots under benchmarks/results",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    st.add_argument(
        "name",
        choices=("localization", "recovery"),
        help="localization: scorers x pruning rates on GLUE tasks; recovery: recovery variants on doe build's flow",
    )
    st.add_argument("--data-dir", default=os.environ.get("DOE_DATA_DIR"), help="GLUE layout folder; env DOE_DATA_DIR")
    st.add_argument("--quick", action="store_true", help="tiny model and generated data: checks the code path")
    st.add_argument("--out", default="benchmarks/results", help="records, report and plot go here")
    st.add_argument("--cache-dir", default=None, help="adapted models and statistics (default <cache>/study)")
    st.add_argument(
        "--tasks",
        default=None,
        help=f"comma-separated tasks (default: {','.join(StudyConfig().tasks)} for localization, "
        f"{','.join(RECOVERY_TASKS)} for recovery)",
    )
    st.add_argument("--rates", default=_default("rates"))
    st.add_argument("--methods", default=_default("methods"))
    st.add_argument(
        "--seeds",
        default=_default("seeds"),
        help="seeds of every method's runs (a seed moves the recovery's shuffling; random also draws other neurons)",
    )
    st.add_argument("--random-seeds", default=_default("random_seeds"), help="seeds the random scorer runs at least")
    st.add_argument(
        "--train-sizes",
        default=format_sizes(StudyConfig().train_sizes),
        help="training examples of the tasks that need more than --max-train to be learned, TASK=N or TASK=none "
        "(the whole split), comma-separated; '' for none",
    )
    st.add_argument(
        "--intermediates",
        default="",
        metavar="TASK=INTERMEDIATE",
        help="tasks trained on another task first (doe build's --intermediate), comma-separated, e.g. rte=snli "
        "(RTE is not learned by MiniLM-L6 from its own split; with SNLI first it is)",
    )
    _add_flow_options(st)
    which = st.add_mutually_exclusive_group()
    which.add_argument(
        "--ablations",
        default=None,
        help="the DoE variants to run at p=0.65, comma-separated (default: all of "
        + ", ".join(ALL_ABLATIONS)
        + "; calib: the calibration sizes)",
    )
    which.add_argument("--no-ablations", action="store_true", help="no DoE variants")
    st.add_argument("--render-only", action="store_true", help="re-render the report from the records")
    st.add_argument("--no-progress", action="store_true")
    return st


def format_sizes(sizes: dict[str, int | None]) -> str:
    return ",".join(f"{task}={'none' if n is None else n}" for task, n in sizes.items())


def parse_sizes(text: str) -> dict[str, int | None]:
    """``cola=none,rte=2000`` as {task: examples or None}; ConfigError naming the part that is not one."""
    sizes: dict[str, int | None] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        task, _, size = part.partition("=")
        if not task or not size:
            raise ConfigError(f"--train-sizes: expected TASK=N or TASK=none, got {part!r}")
        try:
            sizes[task.strip()] = positive_or_none(size.strip())
        except (ValueError, argparse.ArgumentTypeError):
            raise ConfigError(f"--train-sizes: {part!r} is not TASK=N (N >= 1) or TASK=none") from None
    return sizes


def parse_intermediates(text: str) -> dict[str, str]:
    """``rte=snli`` as {task: intermediate task}; ConfigError naming the part that is not one."""
    pairs: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        task, _, first = (x.strip() for x in part.partition("="))
        if not task or not first:
            raise ConfigError(f"--intermediates: expected TASK=INTERMEDIATE (e.g. rte=snli), got {part!r}")
        pairs[task] = first
    return pairs


def study_config(args: argparse.Namespace) -> StudyConfig:
    """The localization study of the flags: the default flow with every given setting applied."""
    from .. import study

    base = StudyConfig()
    ablations = () if args.no_ablations else names(args.ablations) if args.ablations else base.ablations
    if args.quick:
        return StudyConfig(
            **{
                **study.QUICK,
                "methods": names(args.methods),
                "seeds": numbers(args.seeds),
                "train_sizes": parse_sizes(args.train_sizes),
                "intermediates": parse_intermediates(args.intermediates),
                "ablations": ablations,
            }
        )
    flow = base.flow
    flow = replace(
        flow,
        data=replace(flow.data, max_train=args.max_train, max_eval=args.max_eval, max_length=args.max_length),
        adapt=replace(flow.adapt, mode=args.adapt, prompt_length=args.prompt_length, lr=args.lr, epochs=args.epochs),
        recovery=replace(
            flow.recovery,
            params=args.recovery_params,
            distill=args.distill,
            hidden_distill=args.hidden_distill,
            augment=args.augment,
            extra_examples=args.recovery_extra,
            extra_labels=args.recovery_extra_labels,
            epochs=args.recovery_epochs,
            max_examples=args.recovery_examples,
        ),
    )
    return StudyConfig(
        tasks=names(args.tasks) if args.tasks else base.tasks,
        rates=numbers(args.rates, float),
        methods=names(args.methods),
        seeds=numbers(args.seeds),
        random_seeds=numbers(args.random_seeds),
        train_sizes=parse_sizes(args.train_sizes),
        intermediates=parse_intermediates(args.intermediates),
        ablations=ablations,
        flow=flow,
    )


def _localization(args: argparse.Namespace, out: Path) -> int:
    from .. import study
    from ..tasks import default_cache_dir, synthetic_task

    config = study_config(args)
    datasets = loaded = None
    if args.quick:
        from ..loading import tiny_model

        datasets, loaded = [synthetic_task("toy")], tiny_model()
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir() / "study"
    path = study.run_study(
        config, out, cache, data_dir=args.data_dir, progress=not args.no_progress, datasets=datasets, loaded=loaded
    )
    print(f"records: {path}\nreport:  {out / 'localization.md'}")
    return 0


def _recovery(args: argparse.Namespace, out: Path) -> int:
    from .. import recovery_study
    from ..tasks import default_cache_dir, synthetic_task

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir() / "recovery"
    if args.quick:
        from ..loading import tiny_model
        from ..specs import AdaptSpec, BuildConfig, DataSpec, ExportSpec, PruneSpec

        build = BuildConfig(
            model="tiny",
            data=DataSpec(max_train=48, max_dev=8, max_length=24),
            adapt=AdaptSpec(epochs=1),
            prune=PruneSpec(calib_examples=16),
            export=ExportSpec(fp16=False, int8=False),
            progress=False,
        )
        variants = dict(list(recovery_study.VARIANTS.items())[:2])
        path = recovery_study.run(
            ("toy",),
            out,
            cache,
            build=build,
            variants=variants,
            progress=False,
            datasets=[synthetic_task("toy")],
            loaded=tiny_model(),
        )
    else:
        tasks = names(args.tasks) if args.tasks else RECOVERY_TASKS
        path = recovery_study.run(tasks, out, cache, data_dir=args.data_dir, progress=not args.no_progress)
    print(f"records: {path}\nreport:  {out / 'recovery.md'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from .. import recovery_study, study_report

    out = Path(args.out)
    if args.render_only:
        if args.name == "recovery":
            return render_only("doe study", out / "recovery.jsonl", recovery_study.render)
        return render_only("doe study", out / "localization.jsonl", study_report.render)
    return report_errors("doe study", lambda: (_recovery if args.name == "recovery" else _localization)(args, out))


__all__ = ["FIELDS", "add_parser", "run", "study_config"]
