"""Summaries of a study: the ranked trials as a table, and the best parameters as YAML."""

from __future__ import annotations

from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from mapnet_tune.errors import UserError
from mapnet_tune.names import RUN_ID_ATTR, trial_tag
from mapnet_tune.storage import (
    WARM_START_ATTR,
    is_surplus,
    is_warm_start,
    ranked_trials,
)


def trials_table(study: optuna.Study, top: int = 10) -> str:
    """The study's counts and a Markdown table of its best trials.

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
    return "\n".join(lines) + "\n\n" + "\n".join(rows)


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
