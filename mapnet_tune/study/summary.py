"""Summaries of a study: the ranked trials as a table, and the best parameters as YAML."""

from __future__ import annotations

import datetime
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from mapnet_tune.errors import UserError
from mapnet_tune.names import RUN_ID_ATTR, trial_tag
from mapnet_tune.storage import (
    GRACE_S,
    LOST_RETRIES,
    WARM_START_ATTR,
    heartbeat_ages,
    is_surplus,
    is_warm_start,
    ranked_trials,
)


def trials_table(study: optuna.Study, top: int = 10, grace_s: int = GRACE_S) -> str:
    """The study's counts, its running trials, and a Markdown table of its best trials.

    A running trial whose heartbeat is older than ``grace_s`` is shown as stale: its worker
    is gone (killed, machine lost) and the next worker to look at the study retries it.
    Trials copied by a warm start are counted on their own line and left out of the table.
    """
    trials = ranked_trials(study)
    metric = study.user_attrs.get("objective", "value")
    names = sorted({k for t in trials for k in t.params})
    extra = ["val/f1", "val/auc", "val/accuracy"]
    head = ["trial", metric, *extra, "epoch", *names, "mlflow run"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials[:top]:
        m = t.user_attrs.get("metrics", {})
        cells = [
            trial_tag(t.number),
            f"{t.value:.4f}",
            *(f"{m[k]:.4f}" if k in m else "-" for k in extra),
            str(t.user_attrs.get("best_epoch", -1) + 1),
            *(_fmt(t.params.get(k)) for k in names),
            t.user_attrs.get(RUN_ID_ATTR, "-"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    everything = study.get_trials(deepcopy=False)
    warm = [t for t in everything if is_warm_start(t)]
    kept = [t for t in everything if not is_surplus(t) and not is_warm_start(t)]
    counts = {
        s.name.lower(): sum(t.state == s for t in kept)
        for s in (
            TrialState.COMPLETE,
            TrialState.PRUNED,
            TrialState.FAIL,
            TrialState.RUNNING,
            TrialState.WAITING,
        )
    }
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    lines = [f"study {study.study_name}: {summary}"]
    if warm:
        sources = sorted({str(t.user_attrs[WARM_START_ATTR]["study"]) for t in warm})
        lines.append(
            f"warm start: {len(warm)} finished trial(s) copied from {', '.join(sources)} "
            f"(not counted above)"
        )
    ages = heartbeat_ages(study)
    lines += [
        f"{trial_tag(t.number)} {_liveness(ages.get(t.number), grace_s, t)}"
        for t in kept
        if t.state == TrialState.RUNNING
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(rows)


def _liveness(age_s: float | None, grace_s: int, trial: FrozenTrial) -> str:
    """``running`` or ``stale (no heartbeat since 12:03:04, will be retried)``."""
    if age_s is None:
        return "running (no heartbeat recorded)"
    since = (datetime.datetime.now() - datetime.timedelta(seconds=age_s)).strftime("%H:%M:%S")
    if age_s <= grace_s:
        return f"running (last heartbeat {since})"
    # Optuna's retry callback records the chain of earlier attempts on each retry.
    retries = len(trial.system_attrs.get("retry_history", []))
    then = (
        "will be retried"
        if retries < LOST_RETRIES
        else f"will not be retried: {retries} retries used"
    )
    return f"stale (no heartbeat since {since}, {then})"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def export_best(study: optuna.Study, top: int = 1) -> str:
    """YAML with the best trials' parameters, readable by ``search --enqueue``."""
    trials = ranked_trials(study)
    if not trials:
        raise UserError(
            f"study '{study.study_name}' has no completed trial yet; run "
            f"`mapnet-tune search` until one completes"
        )
    doc = {
        "study": study.study_name,
        "objective": study.user_attrs.get("objective"),
        "trials": [
            {"trial": t.number, "value": float(t.value), "params": dict(t.params)}
            for t in trials[:top]
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)
