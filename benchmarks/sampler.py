"""Sample efficiency: does the shipped sampler find good settings in fewer trials than random?

The same study runs with each configuration for ``--trials`` trials over several sampler
seeds, and the script prints one Markdown table: the best objective after 5, 10, 20 and N
trials (mean and standard deviation over the seeds) and the wall time, plus a plot of the
best value so far against the trial count (mean over seeds, with the range).

Configurations (``--configs``):
    random      Optuna's RandomSampler, no pruner.
    tpe         the study file's TPE settings (``n_startup_trials``), no pruner.
    gp          Optuna's GPSampler with the same ``n_startup_trials``, no pruner.
    tpe+pruner  the study file's TPE settings and its pruner section.

Every trial is a real one: ``recipe.suggest`` samples the parameters, MAP-Net is built and
trained by ``engine.fit`` on the study's data, reports each epoch's objective to the pruner
and returns its best epoch's value, exactly as a ``mapnet-tune search`` trial does, without
the MLflow logging. Trials run one after the other in an in-memory Optuna storage. A trial's
training seed depends on the sampler seed and the trial number only, so trial k of every
configuration trains with the same seed: configurations differ by what they sample.

The default study is ``studies/synthetic.yaml`` shrunk to fit two CPU cores (``SYNTHETIC``);
``--dataset drive`` runs ``studies/drive.yaml`` with ``--epochs`` and ``--steps-per-epoch``
for a GPU.

Usage:
    python benchmarks/sampler.py [--dataset synthetic|drive] [--trials 20] [--seeds 0,1,2]
        [--configs random,tpe,gp,tpe+pruner] [--epochs E] [--steps-per-epoch S]
        [--source DRIVE_ROOT] [--device cuda] [--plot docs/sampler.png]
        [--append docs/benchmarks.md]
"""

import argparse
import copy
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from study import default_source
from throughput import report_header

from mapnet_tune import engine
from mapnet_tune.config import StudyConfig, default_study_file, parse_study, read_yaml
from mapnet_tune.data import PreparedDataset, prepare
from mapnet_tune.recipe import augmentation, build_model, search_settings, suggest, trial_seed
from mapnet_tune.study.objective import prune
from mapnet_tune.study.sampling import make_pruner, make_sampler

CONFIGS = ("random", "tpe", "gp", "tpe+pruner")
#: Trial counts the table reports besides N.
CHECKPOINTS = (5, 10, 20)
#: The shipped synthetic study shrunk until one trial takes a few seconds on a shared 2-core
#: CPU: 32x32 images, a 1/8-width MAP-Net, 16 training and 8 validation images, 6 epochs.
#: The pruner keeps the shipped Hyperband with its first rung at a third of the epochs, as
#: the shipped file has it (4 of 12 epochs there, 2 of 6 here).
SYNTHETIC = {
    "dataset": {"options": {"size": 32, "count": {"train": 16, "val": 8, "test": 4}}},
    "model": {"width": 0.125},
    "train": {"epochs": 6},
    "pruner": {"min_resource": 2},
}

optuna.logging.set_verbosity(optuna.logging.ERROR)


def benchmark_study(dataset: str, epochs: int | None, steps: int | None) -> StudyConfig:
    """The shipped study file of ``dataset`` with the benchmark's overrides."""
    path = default_study_file(dataset)
    raw = read_yaml(path, "study file", "pick a shipped dataset")
    overrides = copy.deepcopy(SYNTHETIC) if dataset == "synthetic" else {"train": {}}
    if epochs is not None:
        overrides["train"]["epochs"] = epochs
    if steps is not None:
        overrides["train"]["steps_per_epoch"] = steps
    for section, values in overrides.items():
        merged = dict(raw.get(section) or {})
        for key, value in values.items():
            merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
        raw[section] = merged
    return parse_study(raw, str(path))


def configured(study: StudyConfig, config: str, seed: int) -> StudyConfig:
    """``study`` with the sampler and pruner of one configuration and the sampler seed."""
    sampler, pruner = config.removesuffix("+pruner"), study.pruner.name
    if not config.endswith("+pruner"):
        pruner = "none"
    return study.model_copy(
        update={
            "sampler": study.sampler.model_copy(update={"name": sampler, "seed": seed}),
            "pruner": study.pruner.model_copy(update={"name": pruner}),
        }
    )


@dataclass(frozen=True)
class Run:
    """One configuration with one seed: the best value after each trial, and the wall time."""

    config: str
    seed: int
    best_so_far: list[float]
    complete: int
    pruned: int
    wall_s: float


def run(study: StudyConfig, data: PreparedDataset, trials: int, device: torch.device) -> Run:
    """Run ``trials`` trials of ``study`` one after the other and record the best so far."""
    metric = study.objective.metric
    maximize = study.objective.direction == "maximize"

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, study)
        seed = trial_seed(study.sampler.seed, trial.number)
        torch.manual_seed(seed)
        train = data.splits["train"]
        result = engine.fit(
            build_model(study, data.channels),
            train,
            data.splits["val"],
            search_settings(study, params, seed, train),
            augment=augmentation(params, data.channels, seed, device),
            on_epoch=prune(trial, metric),
            device=device,
        )
        return result.best_metrics[metric]

    config = study.sampler.name + ("+pruner" if study.pruner.name != "none" else "")
    optuna_study = optuna.create_study(
        # Named: Hyperband assigns trials to brackets by a hash of the study name and the
        # trial number, so a random in-memory name would make tpe+pruner irreproducible.
        study_name=f"{config}-seed{study.sampler.seed}",
        direction=study.objective.direction,
        sampler=make_sampler(study),
        pruner=make_pruner(study),
    )
    start = time.perf_counter()
    optuna_study.optimize(objective, n_trials=trials)
    wall_s = time.perf_counter() - start
    best, curve = math.nan, []
    for t in optuna_study.trials:
        if t.state == TrialState.COMPLETE and (
            math.isnan(best) or (t.value > best if maximize else t.value < best)
        ):
            best = t.value
        curve.append(best)
    states = [t.state for t in optuna_study.trials]
    return Run(
        config=config,
        seed=study.sampler.seed,
        best_so_far=curve,
        complete=states.count(TrialState.COMPLETE),
        pruned=states.count(TrialState.PRUNED),
        wall_s=wall_s,
    )


def _mean_sd(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def table(runs: Sequence[Run], trials: int, metric: str) -> list[str]:
    """The Markdown table: one row per configuration, mean ± sd over the seeds."""
    points = [k for k in CHECKPOINTS if k < trials] + [trials]
    head = [
        "configuration",
        *(f"best {metric} after {k}" for k in points),
        "complete / pruned (sum)",
        "wall time (s, mean ± sd)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for config in dict.fromkeys(r.config for r in runs):
        mine = [r for r in runs if r.config == config]
        walls = [r.wall_s for r in mine]
        spread = statistics.stdev(walls) if len(walls) > 1 else 0.0
        cells = [
            config,
            *(_mean_sd([r.best_so_far[k - 1] for r in mine]) for k in points),
            f"{sum(r.complete for r in mine)} / {sum(r.pruned for r in mine)}",
            f"{statistics.mean(walls):.0f} ± {spread:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(runs: Sequence[Run], metric: str, path: Path) -> None:
    """Best value so far against trials: mean over seeds, the band from min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for config in dict.fromkeys(r.config for r in runs):
        curves = [r.best_so_far for r in runs if r.config == config]
        xs = range(1, len(curves[0]) + 1)
        columns = [[c[i] for c in curves if not math.isnan(c[i])] for i in range(len(xs))]
        mean = [statistics.mean(col) if col else math.nan for col in columns]
        ax.plot(xs, mean, label=config)
        ax.fill_between(
            xs,
            [min(col) if col else math.nan for col in columns],
            [max(col) if col else math.nan for col in columns],
            alpha=0.15,
        )
    ax.set_xlabel("trials")
    ax.set_ylabel(f"best {metric} so far")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _describe(study: StudyConfig) -> str:
    options = ", ".join(f"{k} {v}" for k, v in sorted(study.dataset.options.items()))
    space = ", ".join(p.name for p in study.space if p.searched)
    steps = f", at most {study.train.steps_per_epoch} steps" if study.train.steps_per_epoch else ""
    p = study.pruner
    return (
        f"`{Path(study.path).name}` ({options}), MAP-Net width {study.model.width:g}, "
        f"{study.train.epochs} epochs{steps}; searched: {space}; TPE and GP with "
        f"n_startup_trials {study.sampler.n_startup_trials}; the pruner of tpe+pruner: "
        f"{p.name} (min_resource {p.min_resource}, reduction_factor {p.reduction_factor})"
    )


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("synthetic", "drive"), default="synthetic")
    parser.add_argument("--trials", type=int, default=20, help="N, trials per study")
    parser.add_argument("--seeds", default="0,1,2", help="sampler seeds, comma-separated")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"some of {CONFIGS}")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="train.steps_per_epoch")
    parser.add_argument("--source", default=None, help="dataset folder (DRIVE)")
    parser.add_argument("--device", default=None, help="torch device (default cuda if present)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared CPU, OpenMP threads waiting on each other "
        "made a trial 25x slower)",
    )
    parser.add_argument("--plot", type=Path, default=None, help="PNG of best-so-far curves")
    parser.add_argument("--append", type=Path, default=None, help="Markdown file to append to")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _arguments(argv)
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    study = benchmark_study(args.dataset, args.epochs, args.steps_per_epoch)
    device = engine.pick_device(args.device)
    torch.set_num_threads(args.threads)
    data = prepare(study.dataset.name, args.source or default_source(study), study.dataset.options)
    start = time.perf_counter()
    runs = []
    for seed in seeds:
        for config in configs:
            result = run(configured(study, config, seed), data, args.trials, device)
            print(
                f"{config} seed {seed}: best {result.best_so_far[-1]:.4f} in {result.wall_s:.0f} s",
                flush=True,
            )
            runs.append(result)
    metric = study.objective.metric
    lines = [
        *report_header(device, "Sample efficiency of the samplers"),
        f"- study: {_describe(study)}",
        f"- N = {args.trials} trials per study, sampler seeds {args.seeds}; each cell is the "
        f"mean ± standard deviation over the seeds of the best {metric} among the first k "
        f"trials (completed trials only: a pruned trial has no final value)",
        f"- whole run: {time.perf_counter() - start:.0f} s, {args.threads} torch CPU thread(s); "
        f"command: `python benchmarks/sampler.py --dataset {args.dataset} --trials "
        f"{args.trials} --seeds {args.seeds}`",
        "",
        *table(runs, args.trials, metric),
    ]
    if args.plot is not None:
        plot(runs, metric, args.plot)
        lines += ["", f"![best {metric} so far against trials]({args.plot.name})"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.append is not None:
        with args.append.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
