"""The study's parent run tells how the study is going, for whoever opens the MLflow UI.

After every trial any worker ends, the parent run gets the best objective so far (one step
per finished trial), the counts of complete, pruned and failed trials, and a Markdown note
with the best trial's parameters and a link to its run. When the study is complete, its
optimisation-history and parameter-importance plots are logged to the parent too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from mapnet_tune.names import (
    BEST_RUN_TAG,
    RUN_ID_ATTR,
    STUDY_BEST_METRIC,
    TRIAL_COUNT_METRICS,
    trial_tag,
)
from mapnet_tune.plots import study_plots
from mapnet_tune.storage import FINISHED, is_surplus, is_warm_start, ranked_trials
from mapnet_tune.tracking import Tracker
from mapnet_tune.tracking.links import run_anchor

#: Plots logged to the parent run when the study is complete (the report draws them all).
PARENT_PLOTS = ("optimization_history", "param_importances")
#: MLflow shows this tag as the run's description.
NOTE_TAG = "mlflow.note.content"


class StudyStory:
    """An Optuna callback that keeps the parent run's metrics and note up to date.

    Args:
        tracker: The tracking store.
        experiment_id: The study's experiment.
        parent_run_id: The study's parent run.
        target: The number of finished trials the study should reach.
    """

    def __init__(
        self, tracker: Tracker, experiment_id: str, parent_run_id: str, target: int
    ) -> None:
        self.tracker, self.experiment_id = tracker, experiment_id
        self.parent, self.target = parent_run_id, target

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Log the study-wide state after ``trial`` ended (Optuna's callback signature)."""
        if is_surplus(trial):
            return
        trials = [
            t
            for t in study.get_trials(deepcopy=False)
            if not is_surplus(t) and not is_warm_start(t)
        ]
        counts = {
            "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "failed": sum(t.state == TrialState.FAIL for t in trials),
        }
        finished = sum(t.state in FINISHED for t in trials)
        metrics = {TRIAL_COUNT_METRICS[k]: v for k, v in counts.items()}
        best = _best(study)
        if best is not None and trial.state in FINISHED:
            metrics[STUDY_BEST_METRIC] = float(best.value)
        self.tracker.log_metrics(self.parent, metrics, step=finished)
        self.tracker.set_tags(self.parent, {NOTE_TAG: self.note(study, best, counts, finished)})
        if best is not None and best.user_attrs.get(RUN_ID_ATTR):
            self.tracker.set_experiment_tags(
                self.experiment_id, {BEST_RUN_TAG: best.user_attrs[RUN_ID_ATTR]}
            )

    def note(
        self,
        study: optuna.Study,
        best: FrozenTrial | None,
        counts: dict[str, int],
        finished: int,
    ) -> str:
        """The parent run's description: progress, and the best trial with its parameters."""
        metric = study.user_attrs.get("objective", "value")
        lines = [
            f"**Study `{study.study_name}`** on `{study.user_attrs.get('dataset', '?')}`: "
            f"{finished} of {self.target} trials finished ({counts['complete']} complete, "
            f"{counts['pruned']} pruned), {counts['failed']} failed. "
            f"Objective: {study.direction.name.lower()} `{metric}` (its best epoch per trial).",
            "",
        ]
        if best is None:
            lines.append("No trial has completed yet.")
            return "\n".join(lines)
        run_id = best.user_attrs.get(RUN_ID_ATTR)
        name = trial_tag(best.number)
        link = f"[{name}]({run_anchor(self.experiment_id, run_id)})" if run_id else name
        lines += [
            f"Best so far: {link} with `{metric}` = {best.value:.4f} "
            f"at epoch {best.user_attrs.get('best_epoch', -1) + 1}.",
            "",
            "| parameter | value |",
            "|---|---|",
            *(f"| {k} | {_fmt(v)} |" for k, v in sorted(best.params.items())),
            "",
            "Next: `mapnet-tune retrain-best --study " + study.study_name + "` validates the "
            "best trials' retrain recipe and registers the chosen model.",
        ]
        return "\n".join(lines)

    def finish(self, study: optuna.Study) -> None:
        """Log the study's plots to the parent run (once the study is complete)."""
        notes: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in study_plots(study, Path(tmp), PARENT_PLOTS, notes):
                self.tracker.log_file(self.parent, Path(tmp) / name, "plots")


def _best(study: optuna.Study) -> FrozenTrial | None:
    ranked = ranked_trials(study)
    return ranked[0] if ranked else None


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
