"""What a worker tells the person watching it, on stderr.

- Status lines carry the study-wide counters and the estimated time to the requested number
  of trials, from the finished trials' durations.
- At the start: which device trains; after a trial's first steps, how long one trial will
  take, and on a CPU, when that is long, how to shrink the study.
- Within an epoch: on a terminal, a tqdm bar with the rate and the ETA; elsewhere (logs, CI,
  cluster jobs) a plain line at least every ``$MAPNET_TUNE_PROGRESS_S`` seconds (30).
"""

from __future__ import annotations

import statistics
import sys
from time import monotonic
from typing import TextIO

import optuna
import torch
from optuna.trial import TrialState
from tqdm import tqdm

from mapnet_tune.names import trial_tag
from mapnet_tune.settings import progress_interval
from mapnet_tune.storage import FINISHED, finished_here, is_surplus, is_warm_start, ranked_trials

#: How long a trial trains before its duration is estimated (or its first epoch, if shorter).
ESTIMATE_AFTER_S = 10.0
#: A CPU trial estimated longer than this gets the advice on how to shrink the study.
SLOW_TRIAL_S = 30 * 60
#: Plain lines within an epoch, when the stream is not a terminal (``{units}``: the plural).
PLAIN_FORMAT = (
    "{{desc}}: {{n_fmt}}/{{total_fmt}} {units} ({{percentage:.0f}}%) "
    "[{{elapsed}}<{{remaining}}, {{rate_fmt}}]"
)
PLURALS = {"patch": "patches"}


class Progress:
    """One status line per event, and a meter within each epoch.

    Args:
        study: The study, for the study-wide counters.
        target: The number of finished trials the study should reach.
        metric: The objective.
        stream: Where to write (default stderr).
    """

    def __init__(
        self, study: optuna.Study, target: int, metric: str, stream: TextIO | None = None
    ) -> None:
        self.study, self.target, self.metric = study, target, metric
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = progress_interval()
        self.estimated = False

    def line(self, text: str) -> None:
        """Print a progress line with the study-wide counters."""
        trials = [t for t in self.study.get_trials(deepcopy=False) if not is_warm_start(t)]
        done = finished_here(trials)
        pruned = sum(t.state == TrialState.PRUNED for t in trials)
        failed = sum(t.state == TrialState.FAIL and not is_surplus(t) for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        ranked = ranked_trials(self.study)
        best = f"{ranked[0].value:.4f} ({trial_tag(ranked[0].number)})" if ranked else "-"
        eta = _study_eta(trials, self.target - done, running)
        tqdm.write(
            f"[{done}/{self.target} done{eta} | best {self.metric} {best} | pruned {pruned} "
            f"failed {failed}] {text}",
            file=self.stream,
        )
        self.stream.flush()

    def device(self, device: torch.device) -> None:
        """Say which device trains, and on a CPU that a GPU was not found."""
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.line(f"training on {device} ({torch.cuda.get_device_name(index)})")
        elif device.type == "cpu":
            threads = torch.get_num_threads()
            self.line(
                f"training on the CPU with {threads} thread{'s' if threads > 1 else ''}: no CUDA "
                "GPU is visible (pass --device cuda:N, or check CUDA_VISIBLE_DEVICES); real "
                "datasets take hours per trial here"
            )
        else:
            self.line(f"training on {device}")

    def meter(self, trial: int, epochs: int, unit: str, device: torch.device) -> StepMeter:
        """The step callback that shows one trial's epochs (see :class:`StepMeter`)."""
        return StepMeter(self, trial_tag(trial), epochs, unit, device)


class StepMeter:
    """Called after every optimiser step of a trial; shows the epoch's rate and ETA.

    It also estimates, once per worker, how long a whole trial takes from its first steps.
    """

    def __init__(
        self, progress: Progress, name: str, epochs: int, unit: str, device: torch.device
    ) -> None:
        self.progress, self.name, self.epochs = progress, name, epochs
        self.unit, self.device = unit, device
        self.units = PLURALS.get(unit, unit + "s")
        self.created = monotonic()
        # The end of the trial's first step: the estimate leaves out that step's warm-up.
        self.first_step_end: float | None = None
        self.epoch_started = self.last_line = 0.0
        self.done = self.total = self.steps_taken = 0
        self.bar: tqdm | None = None

    def __call__(self, epoch: int, step: int, steps: int, samples: int) -> None:
        now = monotonic()
        if step == 1:
            self._start_epoch(epoch, steps * samples, now)
        self.done += samples
        self.steps_taken += 1
        if self.first_step_end is None:
            self.first_step_end = now
        if self.bar is not None:
            self.bar.update(samples)
        elif now - self.last_line >= self.progress.every_s and step < steps:
            self.last_line = now
            self.progress.line(self._plain(epoch, now))
        measured = now - self.first_step_end
        if not self.progress.estimated and (
            (measured >= ESTIMATE_AFTER_S and self.steps_taken > 1)
            or (epoch == 0 and step == steps)
        ):
            self.progress.estimated = True
            self._estimate(now, steps)
        if step == steps and self.bar is not None:
            self.bar.close()
            self.bar = None

    def _start_epoch(self, epoch: int, total: int, now: float) -> None:
        self.epoch_started = self.last_line = now
        self.done, self.total = 0, total
        if self.progress.tty:
            self.bar = tqdm(
                total=total,
                desc=f"{self.name} epoch {epoch + 1}/{self.epochs}",
                unit=self.unit,
                file=self.progress.stream,
                leave=False,
                dynamic_ncols=True,
            )

    def _plain(self, epoch: int, now: float) -> str:
        return tqdm.format_meter(
            self.done,
            self.total,
            now - self.epoch_started,
            prefix=f"{self.name} epoch {epoch + 1}/{self.epochs}",
            unit=self.unit,
            bar_format=PLAIN_FORMAT.format(units=self.units),
        )

    def _estimate(self, now: float, steps: int) -> None:
        if self.steps_taken > 1:
            per_step = (now - self.first_step_end) / (self.steps_taken - 1)
        else:
            per_step = now - self.created
        trial_s = per_step * steps * self.epochs
        rate = self.done / self.steps_taken / max(per_step, 1e-9)
        text = (
            f"{self.name}: about {tqdm.format_interval(trial_s)} per trial on {self.device} "
            f"({self.epochs} epochs of {steps} steps at {rate:.1f} {self.units}/s, measured "
            f"over its first {self.steps_taken} steps; validation comes on top)"
        )
        if self.device.type == "cpu" and trial_s > SLOW_TRIAL_S:
            text += (
                "; to shrink the study, train on a GPU (--device cuda:N), or run a copy of "
                "the study file (--config) with fewer train.epochs or train.steps_per_epoch, "
                "or a train.max_minutes budget; --dataset synthetic tries the whole loop in "
                "minutes"
            )
        self.progress.line(text)


def _study_eta(trials: list, left: int, running: int) -> str:
    """`` | ETA 1:02:03`` to the requested trials, from the finished trials' mean duration."""
    durations = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.state in FINISHED and t.datetime_start and t.datetime_complete
    ]
    if left <= 0 or not durations:
        return ""
    seconds = statistics.fmean(durations) * left / max(running, 1)
    return f" | ETA {tqdm.format_interval(seconds)}"
