"""The champion as the gate meets it when it was selected on another basis.

A champion registered from another study (another sampler seed, so other folds), with other
dataset options or another selection mode has numbers that say nothing about the current
folds. By default its own (trial, recipe) is rebuilt from what its version records and
validated again on the current folds, as one more candidate that cannot be registered; with
``--gate refuse``, or when it cannot be rebuilt, the champion stays and the command says why.

A re-run's numbers go on the champion's version, one tag per selection digest, so that later
commands on the same folds compare against them instead of training the champion again.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import optuna

from mapnet_tune.config import RecipeConfig, check_channels
from mapnet_tune.data import prepare
from mapnet_tune.errors import UserError
from mapnet_tune.modelcard import (
    BASIS_TAG,
    DIGEST_TAG,
    RECIPE_SETTINGS_TAG,
    SEED_TAG,
    TRAINING_DIGEST_TAG,
)
from mapnet_tune.names import CHAMPION
from mapnet_tune.recipe import Retraining, suggest, trial_seed
from mapnet_tune.retrain.plan import Candidate, Plan, check_candidate, sealed, train_and_val
from mapnet_tune.retrain.selection import Standing, training_digest
from mapnet_tune.storage import load_existing_study
from mapnet_tune.tracking import ModelVersionInfo, Tracker

#: Prefix of the version tag holding a re-run's numbers; the selection digest follows.
RERUN_TAG_PREFIX = "selection.rerun."


@dataclass
class Rival:
    """The champion, selected on another basis.

    Attributes:
        version: Its version.
        differs: The parts of the selection basis that differ from the current one.
        candidate: Its (trial, recipe) rebuilt for the current folds; None when not re-run.
        refused: Why it is not re-run (``--gate refuse``, or what is missing to rebuild it).
        standing: Its numbers on the current folds, once re-run.
        recorded_run: The run of an earlier re-run on these folds whose numbers are reused.
    """

    version: str
    differs: list[str]
    candidate: Candidate | None = None
    refused: str = ""
    standing: Standing | None = None
    recorded_run: str = ""

    def mismatch(self) -> str:
        """``the selection digest differs from version 2's (folds, seed)``."""
        return (
            f"the selection digest differs from version {self.version}'s "
            f"({', '.join(self.differs) or 'it records no selection basis'})"
        )

    def compared(self) -> str:
        """Where its numbers on the current folds come from, in words."""
        if self.candidate is not None:
            return (
                f"its candidate {self.candidate.tag} was re-run on the current folds as one more "
                "candidate"
            )
        return f"its numbers re-run on the current folds are reused ({self.recorded_run})"

    def not_run(self) -> str:
        """The gate's line when the champion is not re-run now: numbers reused, or why not."""
        how = self.compared() if self.recorded_run else f"{self.refused}: it is not compared"
        return f"gate: {self.mismatch()}; {how}"


def find_rival(plan: Plan, tracker: Tracker) -> Rival | None:
    """The champion when its selection basis is not the plan's; None when it is, or absent."""
    champion = tracker.version_by_alias(plan.model_name, CHAMPION)
    if champion is None or champion.tags.get(DIGEST_TAG) == plan.basis.digest():
        return None
    try:
        parts = json.loads(champion.tags[BASIS_TAG])
    except (KeyError, ValueError):
        parts = None  # registered before versions recorded their basis
    rival = Rival(champion.version, plan.basis.differences(parts) if parts else [])
    recorded = champion.tags.get(RERUN_TAG_PREFIX + plan.basis.digest())
    if recorded is not None:
        # Numbers measured on this very basis: comparing them is like with like, refused or not.
        numbers = json.loads(recorded)
        rival.standing = Standing(champion.version, numbers["value"], tuple(numbers["folds"]))
        rival.recorded_run = numbers["run"]
        return rival
    if plan.request.gate == "refuse":
        rival.refused = "--gate refuse was given"
        return rival
    try:
        rival.candidate = rebuild(plan, champion)
    except UserError as exc:
        rival.refused = f"its candidate cannot be re-run: {exc}"
    return rival


def record_rerun(tracker: Tracker, plan: Plan, rival: Rival, cand: Candidate) -> None:
    """The numbers of ``rival``'s re-run ``cand``: on ``rival``, and on the champion's version
    under the plan's digest."""
    rival.standing = Standing.read(rival.version, cand.validation, plan.selection, plan.folds)
    numbers = {"value": rival.standing.value, "folds": rival.standing.folds, "run": cand.run_id}
    tag = {RERUN_TAG_PREFIX + plan.basis.digest(): json.dumps(numbers)}
    tracker.set_version_tags(plan.model_name, rival.version, tag)


def rebuild(plan: Plan, champion: ModelVersionInfo) -> Candidate:
    """The champion's (trial, recipe) on the plan's data and folds.

    Its study's trial when the current storage holds it, else the parameters its version
    records; its recorded seed, recipe settings and dataset options.

    Raises:
        UserError: What is missing or different, in words.
    """
    tags, config = champion.tags, plan.config
    if tags.get(TRAINING_DIGEST_TAG, training_digest(config)) != training_digest(config):
        raise UserError(
            f"study '{tags.get('study')}' trained another model, training settings or "
            f"objective than {config.path}"
        )
    number = int(tags.get("trial", "-1"))
    recipe = _recipe(plan, tags)
    trial, params = _trial(plan, tags.get("study", ""), number), _params(tags)
    if trial is not None:
        # Failing that (another search space), the recorded parameters are those it trained with.
        with contextlib.suppress(KeyError, ValueError):
            params = suggest(optuna.trial.FixedTrial(trial.params), config)
    else:
        trial = optuna.trial.FrozenTrial(
            number=number,
            state=optuna.trial.TrialState.COMPLETE,
            value=float("nan"),
            datetime_start=None,
            datetime_complete=None,
            params=params,
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
            trial_id=-1,
        )
    seed = int(tags.get(SEED_TAG, trial_seed(config.sampler.seed, number)))
    options = json.loads(tags.get("dataset.options", "{}"))
    data = prepare(config.dataset.name, plan.request.source or config.dataset.source, options)
    check_channels(config, data.channels)
    if tuple(sorted(train_and_val(data).names)) != plan.basis.pool:
        raise UserError(
            f"its dataset options {options} give other train + val images than the current pool"
        )
    name = tags.get("recipe", "default")
    cand = Candidate(trial, Retraining(config, name, recipe, params, seed), sealed(data))
    check_candidate(plan, cand)
    return cand


def _recipe(plan: Plan, tags: dict[str, str]) -> RecipeConfig:
    if RECIPE_SETTINGS_TAG in tags:
        return RecipeConfig.model_validate(json.loads(tags[RECIPE_SETTINGS_TAG]))
    name = tags.get("recipe", "default")
    if name not in plan.config.retrain.recipes:
        raise UserError(f"its recipe '{name}' is not recorded and not in {plan.config.path}")
    return plan.config.retrain.recipes[name]


def _trial(plan: Plan, study: str, number: int) -> optuna.trial.FrozenTrial | None:
    """The trial in the current storage, or None when the storage does not hold its study."""
    try:
        trials = load_existing_study(plan.request.storage, study).get_trials(deepcopy=False)
    except UserError:
        return None
    return next((t for t in trials if t.number == number), None)


def _params(tags: dict[str, str]) -> dict[str, object]:
    """The hyperparameters a version records as ``param.*`` tags, typed again."""
    params: dict[str, object] = {}
    for key, text in tags.items():
        if key.startswith("param."):
            try:
                value: object = json.loads(text)
            except ValueError:
                value = {"True": True, "False": False}.get(text, text)
            params[key.removeprefix("param.")] = value
    if not params:
        raise UserError("its version records no param.* tags")
    return params
