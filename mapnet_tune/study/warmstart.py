"""``search --warm-start OLD_STUDY``: a new study starts from what an earlier one learned.

The old study's finished trials whose parameters lie inside the new search space are copied
into the new study with ``Study.add_trials``, so that the sampler models them from the first
trial on. Nothing is re-trained: each copy keeps its value (or, pruned, its per-epoch
values), its metrics and its MLflow run id, and is marked with ``WARM_START_ATTR``, so that
it neither counts toward ``--trials`` nor competes for the new study's best trial. In MLflow
each copy gets a small child run of the new study's parent that points at the run that
trained it.

The copy is made once, by the worker that creates the new study, before it creates the
study's parent run; workers started with it wait for that parent run, so they find the
copies in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mapnet_tune.config import HYPERPARAMETERS, ParamSpec, StudyConfig
from mapnet_tune.errors import UserError, redact_url
from mapnet_tune.names import (
    ROLE_TAG,
    RUN_ID_ATTR,
    SEARCH_SOURCE,
    STUDY_TAG,
    TRIAL_TAG,
    params_for_log,
    trial_tag,
)
from mapnet_tune.recipe import search_distributions
from mapnet_tune.storage import (
    FINISHED,
    WARM_START_ATTR,
    is_warm_start,
    load_existing_study,
)
from mapnet_tune.study.request import SearchRequest
from mapnet_tune.tracking import Tracker

#: Study user attribute: the values of the hyperparameters the study does not search, so that
#: a later warm start knows every setting its trials ran with.
FIXED_PARAMS_ATTR = "fixed_params"
#: Study user attribute recording the warm start it was created with.
WARM_SOURCE_ATTR = "warm_started_from"
#: Tags of a warm-start run: the study, trial and run that trained the copied trial.
FROM_STUDY_TAG = "mapnet_tune.warm_start.study"
FROM_TRIAL_TAG = "mapnet_tune.warm_start.trial"
FROM_RUN_TAG = "mapnet_tune.warm_start.run_id"
#: The study user attributes that must agree for values to be comparable.
_MUST_MATCH = {"dataset": "dataset", "objective": "objective metric"}


@dataclass(frozen=True)
class WarmStart:
    """What a warm start copied.

    Attributes:
        source: The old study's name.
        copied: The new study's copies, in the order they were added.
        skipped: Finished trials left out because a parameter lies outside the new space.
    """

    source: str
    copied: list[FrozenTrial]
    skipped: int

    def line(self) -> str:
        """One line for the terminal."""
        pruned = sum(t.state == TrialState.PRUNED for t in self.copied)
        return (
            f"warm start from study '{self.source}': copied {len(self.copied)} finished "
            f"trial(s) ({pruned} pruned), skipped {self.skipped} outside the new search space; "
            f"they guide the sampler and do not count toward --trials"
        )


def open_source(req: SearchRequest) -> optuna.Study:
    """The study ``--warm-start`` names, checked before anything is written.

    Raises:
        UserError: When it is missing, or searched another dataset or objective.
    """
    assert req.warm_start is not None
    old = load_existing_study(req.warm_storage, req.warm_start, "--warm-start and --warm-storage")
    _check_comparable(old, req)
    return old


def copy_trials(study: optuna.Study, old: optuna.Study, req: SearchRequest) -> WarmStart:
    """Copy the finished trials of ``old`` that lie inside ``req.study``'s search space.

    Args:
        study: The new study, just created.
        old: The study to copy from (see :func:`open_source`).
        req: The search request (the study file, and ``warm_storage`` for the record).
    """
    # Studies made before FIXED_PARAMS_ATTR existed fixed what they did not search, almost
    # always at the defaults; those are assumed for them.
    fixed = old.user_attrs.get(FIXED_PARAMS_ATTR, {})
    distributions = search_distributions(req.study)
    copies, skipped = [], 0
    for trial in old.get_trials(deepcopy=False, states=FINISHED):
        params = _inside(req.study, {**HYPERPARAMETERS, **fixed, **trial.params})
        if params is None:
            skipped += 1
            continue
        copies.append(_copy(trial, old.study_name, params, distributions))
    study.set_user_attr(
        WARM_SOURCE_ATTR,
        {"study": old.study_name, "storage": redact_url(req.warm_storage or "")},
    )
    study.add_trials(copies)
    copied = [t for t in study.get_trials(deepcopy=False) if is_warm_start(t)]
    return WarmStart(old.study_name, copied, skipped)


def check_warm_started(study: optuna.Study, req: SearchRequest) -> None:
    """Refuse ``--warm-start`` on a study that was created without that warm start.

    Raises:
        UserError: Naming the study and how to start a new one.
    """
    source = study.user_attrs.get(WARM_SOURCE_ATTR, {}).get("study")
    if source != req.warm_start:
        raise UserError(
            f"study '{req.study_name}' exists and was not warm-started from "
            f"'{req.warm_start}' (a warm start happens when a study is created); pass "
            f"--study NEW_NAME to start a warm-started study, or drop --warm-start to resume"
        )


def link_runs(
    tracker: Tracker,
    experiment_id: str,
    parent_run_id: str,
    warm: WarmStart,
    study: StudyConfig,
    study_name: str,
) -> None:
    """One child run per copied trial, pointing at the run that trained it (no training)."""
    for trial in warm.copied:
        source = trial.user_attrs[WARM_START_ATTR]
        old_run = trial.user_attrs.get(RUN_ID_ATTR, "")
        run_id = tracker.create_run(
            experiment_id,
            f"{study.dataset.name}-{trial_tag(trial.number)}-warm",
            {
                STUDY_TAG: study_name,
                TRIAL_TAG: str(trial.number),
                ROLE_TAG: "warm-start",
                FROM_STUDY_TAG: source["study"],
                FROM_TRIAL_TAG: str(source["trial"]),
                FROM_RUN_TAG: old_run,
                "mlflow.note.content": (
                    f"Copied by `search --warm-start` from study `{source['study']}`, "
                    f"{trial_tag(source['trial'])} (MLflow run `{old_run or 'none'}`), "
                    f"{trial.state.name.lower()}; not trained in this study."
                ),
            },
            parent_run_id=parent_run_id,
            source=SEARCH_SOURCE,
        )
        tracker.log_params(run_id, params_for_log(trial.params))
        tracker.end_run(run_id, "FINISHED" if trial.state == TrialState.COMPLETE else "KILLED")


def _check_comparable(old: optuna.Study, req: SearchRequest) -> None:
    """Raise unless the old study searched the same dataset for the same objective."""
    new = {"dataset": req.study.dataset.name, "objective": req.study.objective.metric}
    for key, what in _MUST_MATCH.items():
        if old.user_attrs.get(key) != new[key]:
            raise UserError(
                f"--warm-start {old.study_name} has {what} '{old.user_attrs.get(key, '?')}' but "
                f"{req.study.path} has '{new[key]}'; its values do not compare, so warm-start "
                f"from a study of the same {what}"
            )
    if old.direction.name.lower() != req.study.objective.direction:
        raise UserError(
            f"--warm-start {old.study_name} was to {old.direction.name.lower()} its objective "
            f"but {req.study.path} is to {req.study.objective.direction} it; warm-start from a "
            f"study with the same direction"
        )


def _inside(study: StudyConfig, values: dict[str, Any]) -> dict[str, Any] | None:
    """The new study's sampled parameters for a trial with ``values``; None if outside."""
    params = {}
    for p in study.space:
        value = values.get(p.name)
        if p.kind == "fixed":
            if value is None or not math.isclose(value, p.value):
                return None
        elif not _contains(p, value):
            return None
        else:
            params[p.name] = int(value) if p.kind == "int" else value
    return params


def _contains(p: ParamSpec, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if p.kind == "categorical":
        return value in p.choices
    if p.kind == "int" and not float(value).is_integer():
        return False
    return p.low <= value <= p.high


def _copy(
    trial: FrozenTrial,
    source: str,
    params: dict[str, Any],
    distributions: dict[str, optuna.distributions.BaseDistribution],
) -> FrozenTrial:
    """A new trial with ``trial``'s result and ``params``, marked with where it ran."""
    origin = trial.user_attrs.get(WARM_START_ATTR, {"study": source, "trial": trial.number})
    kept = {
        k: v for k, v in trial.user_attrs.items() if k in (RUN_ID_ATTR, "metrics", "best_epoch")
    }
    return optuna.trial.create_trial(
        state=trial.state,
        value=trial.value if trial.state == TrialState.COMPLETE else None,
        params=params,
        distributions={name: distributions[name] for name in params},
        user_attrs={**kept, WARM_START_ATTR: origin},
        intermediate_values=dict(trial.intermediate_values),
    )
