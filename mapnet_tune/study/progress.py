"""What a worker tells the person watching it: one status line per event on stderr."""

from __future__ import annotations

import sys

import optuna
from optuna.trial import TrialState

from mapnet_tune.names import trial_tag
from mapnet_tune.storage import FINISHED, is_surplus


class Progress:
    """One status line per event on stderr: trial i of N, epoch, best so far, pruned/failed."""

    def __init__(self, study: optuna.Study, target: int, metric: str) -> None:
        self.study, self.target, self.metric = study, target, metric

    def line(self, text: str) -> None:
        """Print a progress line with the study-wide counters."""
        trials = self.study.get_trials(deepcopy=False)
        done = sum(t.state in FINISHED for t in trials)
        pruned = sum(t.state == TrialState.PRUNED for t in trials)
        failed = sum(t.state == TrialState.FAIL and not is_surplus(t) for t in trials)
        try:
            best = f"{self.study.best_value:.4f} ({trial_tag(self.study.best_trial.number)})"
        except ValueError:
            best = "-"
        print(
            f"[{done}/{self.target} done | best {self.metric} {best} | pruned {pruned} "
            f"failed {failed}] {text}",
            file=sys.stderr,
            flush=True,
        )
