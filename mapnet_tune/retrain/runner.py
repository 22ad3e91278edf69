"""retrain-best, the work: validate every candidate's recipe, train the chosen model,
register it, then score it once on test.

Every run (the retrain parent, one per candidate, one per fold) ends with the truth: an
interrupt or a failure ends whatever is open as KILLED or FAILED.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from mapnet_tune import engine
from mapnet_tune.data import PreparedDataset, Split
from mapnet_tune.data.splits import take
from mapnet_tune.metrics import MetricAccumulator
from mapnet_tune.modelcard import ModelCard
from mapnet_tune.names import (
    CHAMPION,
    FINGERPRINT_TAG,
    FOLD_TAG,
    GIT_TAG,
    RECIPE_TAG,
    RETRAIN_SOURCE,
    ROC_ARTIFACT,
    ROLE_TAG,
    RUN_ID_ATTR,
    SEARCH_RUN_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    params_for_log,
)
from mapnet_tune.recipe import build_model
from mapnet_tune.retrain.plan import (
    Candidate,
    Plan,
    RetrainRequest,
    choose_trials,
    final_train,
    kfold,
    make_plan,
    recipe_params,
    say,
    selection_note,
    train_and_val,
)
from mapnet_tune.retrain.register import make_card, predict_command, register
from mapnet_tune.retrain.rival import Rival, find_rival, record_rerun
from mapnet_tune.retrain.selection import choose_threshold, fold_key
from mapnet_tune.retrain.tables import registered_table, test_key, validation_table
from mapnet_tune.tracking import Tracker, git_sha


def retrain_best(req: RetrainRequest) -> str:
    """Validate the top trials' recipes, register the chosen models, score them on test once.

    Args:
        req: The study, how many trials, the folds and recipes, and whether to retrain trials
            that are registered already.

    Returns:
        The summary for the user: notes, skipped trials, the decisions and a table.

    Raises:
        UserError: An unknown or empty study, a study without completed trials, a study file
            that does not match the study, an unknown recipe, or data that cannot be prepared.
            Nothing is created in MLflow in those cases.
    """
    tracker = Tracker(req.tracking_uri)
    tracker.check_reachable()
    study, config, chosen, skipped = choose_trials(req, tracker)
    if not chosen:
        return "\n".join([*skipped, "nothing to retrain"])
    plan = make_plan(req, study, config, chosen, skipped)
    lines = [*plan.skipped, selection_note(plan)]
    for line in lines:
        say(line)
    lines += Runner(plan, tracker).run()
    lines += ["", *tracker.serve_commands(f"models:/{plan.model_name}@{CHAMPION}")]
    lines += ["", tracker.browse(plan.study.study_name)]
    return "\n".join(lines)


class Runner:
    """Creates the runs, validates, trains, registers and scores; every run ends truthfully."""

    def __init__(self, plan: Plan, tracker: Tracker) -> None:
        self.plan, self.tracker = plan, tracker
        self.device = engine.pick_device(plan.request.device)
        self.experiment_id = ""
        self.parent = ""
        self.running: list[str] = []

    def run(self) -> list[str]:
        """Validate every candidate, register the chosen ones, score them on test.

        Returns:
            Summary lines: the validation table, champion decisions, the registered versions.
        """
        plan = self.plan
        self.experiment_id = self.tracker.experiment(plan.study.study_name)
        self.parent = self._start(f"{plan.config.dataset.name}-retrain", self._tags("retrain"))
        self.tracker.log_params(
            self.parent,
            {
                "top_k": plan.request.top_k,
                "force": plan.request.force,
                "folds": plan.folds,
                "selection": plan.selection,
                "candidates": ",".join(c.tag for c in plan.candidates),
            },
        )
        try:
            lines = self._run_candidates()
        except BaseException as exc:
            # Every run still open (innermost first) ends with what stopped it.
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            for run_id in reversed(self.running):
                self.tracker.end_run(run_id, status, f"{type(exc).__name__}: {exc}")
            raise
        self._finish(self.parent)
        return lines

    def _start(
        self,
        name: str,
        tags: dict[str, str],
        parent: str | None = None,
        data: PreparedDataset | None = None,
    ) -> str:
        run_id = self.tracker.create_run(
            self.experiment_id, name, tags, parent_run_id=parent, source=RETRAIN_SOURCE
        )
        self.running.append(run_id)
        if data is not None:
            self.tracker.log_dataset(run_id, data.name, data.fingerprint, data.source)
        return run_id

    def _finish(self, run_id: str, reason: str | None = None) -> None:
        self.running.remove(run_id)
        self.tracker.end_run(run_id, "FINISHED", reason)

    def _tags(self, role: str, cand: Candidate | None = None) -> dict[str, str]:
        tags = {
            STUDY_TAG: self.plan.study.study_name,
            ROLE_TAG: role,
            GIT_TAG: git_sha(),
        }
        if cand is not None:
            tags.update(
                {
                    TRIAL_TAG: str(cand.trial.number),
                    RECIPE_TAG: cand.retraining.name,
                    FINGERPRINT_TAG: cand.data.fingerprint,
                }
            )
        return tags

    def _run_candidates(self) -> list[str]:
        plan = self.plan
        for cand in plan.candidates:
            self._open(cand, "retrain-trial", f"{plan.config.dataset.name}-retrain-{cand.tag}")
        for cand in plan.candidates:
            self._validate(cand)
        lines = [validation_table(plan, plan.candidates)]
        chosen = plan.candidates
        if plan.folds:
            chosen = [_best(plan.candidates, plan.selection, plan.maximize)]
            lines.append(f"chosen by {plan.selection}: {chosen[0].tag}")
            for cand in plan.candidates:
                if cand is not chosen[0]:
                    self._finish(
                        cand.run_id,
                        f"not registered: {chosen[0].tag} has the best {plan.selection}",
                    )
        rival = self._rival(lines)
        rows = []
        for cand in chosen:
            version, decision, card = self._final(cand, rival)
            self._finish(cand.run_id)
            lines.append(
                f"{cand.tag} registered as {plan.model_name} version {version}: {decision}"
            )
            rows.append((cand, version, card))
        aliases = {v.version: v.aliases for v in self.tracker.versions(plan.model_name)}
        return [*lines, "", registered_table(plan, rows, aliases)]

    def _open(self, cand: Candidate, role: str, name: str) -> None:
        """The candidate's run, with its parameters and the recipe in full."""
        cand.run_id = self._start(
            name,
            {**self._tags(role, cand), SEARCH_RUN_TAG: cand.trial.user_attrs.get(RUN_ID_ATTR, "")},
            self.parent,
            cand.data,
        )
        self.tracker.log_params(
            cand.run_id,
            {
                **params_for_log(cand.retraining.params),
                **recipe_params(self.plan, cand, self.device),
            },
        )

    def _validate(self, cand: Candidate) -> None:
        if self.plan.folds:
            self._cross_validate(cand)
        else:
            self._validate_on_val(cand)

    def _rival(self, lines: list[str]) -> Rival | None:
        """A champion selected on another basis, re-run on the current folds unless refused."""
        plan = self.plan
        rival = find_rival(plan, self.tracker)
        if rival is None:
            return None
        if rival.candidate is None:
            lines.append(rival.not_run())
            say(lines[-1])
            return rival
        cand = rival.candidate
        lines.append(
            f"gate: {rival.mismatch()}; re-running its candidate {cand.tag} on the current "
            f"folds as one more candidate (it is not registered again)"
        )
        say(lines[-1])
        self._open(
            cand,
            "retrain-champion",
            f"{plan.config.dataset.name}-retrain-{cand.tag}-champion-v{rival.version}",
        )
        self._validate(cand)
        self._finish(
            cand.run_id,
            f"version {rival.version} (the champion) re-run on the current folds; not registered",
        )
        record_rerun(self.tracker, plan, rival, cand)
        lines.append(validation_table(plan, [cand]) + f" (champion version {rival.version})")
        return rival

    def _train(
        self, cand: Candidate, train: Split, val: Split | None, run_id: str, label: str
    ) -> tuple[torch.nn.Module, dict[str, float]]:
        """A fresh model trained with the candidate's recipe, holding the final weights.

        With ``val``, the held-out images are scored every ``val_every`` epochs and after
        the last, and logged as the run's validation curve.

        Returns:
            (the model, the ``val/*`` metrics of its final weights; empty without ``val``).
        """
        rt = cand.retraining
        train = rt.training_view(train)
        settings = rt.settings(train)
        torch.manual_seed(rt.seed)
        model = build_model(self.plan.config, cand.data.channels)

        def on_epoch(epoch: int, metrics: dict[str, float], _: torch.nn.Module, __: bool) -> None:
            self.tracker.log_metrics(run_id, metrics, step=epoch)
            key = self.plan.config.objective.metric
            shown = f" {key} {metrics[key]:.4f}" if key in metrics else ""
            loss = metrics["train/loss"]
            say(f"{label} epoch {epoch + 1}/{settings.epochs} loss {loss:.4f}{shown}")

        # GPU and CPU memory and utilisation beside the curves, as a trial's run has them.
        with self.tracker.system_metrics(run_id, enabled=self.device.type == "cuda"):
            result = engine.fit(
                model,
                train,
                val,
                settings,
                augment=rt.augmentation(cand.data.channels, self.device),
                on_epoch=on_epoch,
                device=self.device,
            )
        # The last epoch is always validated: its numbers are those of the weights kept.
        final = result.history[-1] if result.history else {}
        return model, {k: v for k, v in final.items() if k.startswith("val/")}

    def _cross_validate(self, cand: Candidate) -> None:
        """Train on all folds but one with the recipe, score the one left out; log each.

        With ``retrain.threshold: tune`` the held-out probabilities are pooled into
        ``cand.oof``, to choose the threshold on data no fold model trained on.
        """
        plan = self.plan
        merged = train_and_val(cand.data)
        scores: list[dict[str, float]] = []
        folds = kfold(plan, merged)
        cand.oof = MetricAccumulator() if plan.config.retrain.threshold == "tune" else None
        for index, (rest, held) in enumerate(folds):
            run_id = self._start(
                f"{plan.config.dataset.name}-retrain-{cand.tag}-fold{index + 1}",
                {**self._tags("retrain-fold", cand), FOLD_TAG: str(index + 1)},
                cand.run_id,
                cand.data,
            )
            self.tracker.log_params(run_id, {"held_out": ",".join(merged.names[i] for i in held)})
            held_out = take(merged, held)
            model, metrics = self._train(
                cand,
                take(merged, rest),
                held_out,
                run_id,
                f"{cand.tag} fold {index + 1}/{len(folds)}",
            )
            if cand.oof is not None:
                self._score(cand, model, held_out, cand.oof)
            self._finish(run_id)
            scores.append(metrics)
        key = plan.config.objective.metric
        for name in scores[0]:
            values = np.array([s[name] for s in scores], dtype=float)
            cand.validation[f"cv/{name}_mean"] = float(np.mean(values))
            cand.validation[f"cv/{name}_std"] = float(np.std(values))
        # The per-fold values of the selection metric: the gate pairs them fold by fold.
        for index, fold in enumerate(scores):
            cand.validation[fold_key(plan.selection, index + 1)] = fold[key]
        self.tracker.log_metrics(cand.run_id, cand.validation, step=cand.retraining.recipe.epochs)
        say(
            f"{cand.tag} {len(scores)}-fold {key} {cand.validation[f'cv/{key}_mean']:.4f} "
            f"+- {cand.validation[f'cv/{key}_std']:.4f}"
        )

    def _validate_on_val(self, cand: Candidate) -> None:
        """Train on train with the recipe and score val: the model that may be registered."""
        val = cand.data.splits["val"]
        cand.model, cand.validation = self._train(
            cand, cand.data.splits["train"], val, cand.run_id, cand.tag
        )
        if self.plan.config.retrain.threshold == "tune":
            cand.oof = MetricAccumulator()
            self._score(cand, cand.model, val, cand.oof)
        say(f"{cand.tag} {self.plan.selection} {cand.validation[self.plan.selection]:.4f}")

    def _score(
        self, cand: Candidate, model: torch.nn.Module, split: Split, accumulator: MetricAccumulator
    ) -> None:
        """Add the recipe's validation-time predictions of ``split`` to ``accumulator``."""
        rt = cand.retraining
        evaluation = rt.evaluation(rt.training_view(cand.data.splits["train"]))
        engine.evaluate(model, split, evaluation, device=self.device, accumulator=accumulator)

    def _final(self, cand: Candidate, rival: Rival | None) -> tuple[str, str, ModelCard]:
        """The registered model: trained (after CV), registered, gated, then scored on test."""
        plan = self.plan
        if cand.model is None:
            cand.model, _ = self._train(
                cand, final_train(plan, cand.data), None, cand.run_id, f"{cand.tag} final"
            )
        threshold, rule = choose_threshold(plan.config, plan.folds, cand.oof)
        say(f"{cand.tag} threshold {threshold:g}: {rule}")
        card = make_card(plan, cand, threshold, rule)
        version, decision, model_id = register(self.tracker, plan, cand, card, rival)
        say(decision)
        sealed = cand.data.splits.get("test")
        if sealed is not None:
            # After every decision: the one look at test, stored with the version.
            test = sealed.release()
            accumulator = MetricAccumulator(card.evaluation.threshold)
            metrics = engine.evaluate(
                cand.model,
                test,
                card.evaluation,
                "test",
                device=self.device,
                legacy=True,
                accumulator=accumulator,
            )
            card = card.with_test(metrics)
            self.tracker.log_metrics(
                cand.run_id, metrics, step=cand.retraining.recipe.epochs, model_id=model_id
            )
            self._log_roc(cand.run_id, accumulator, metrics, "test")
            self.tracker.set_version_tags(plan.model_name, version, card.tags())
            self.tracker.set_version_description(
                plan.model_name, version, card.markdown(predict_command(plan, version))
            )
            key = test_key(plan)
            say(
                f"{cand.tag} {key} {metrics.get(key, math.nan):.4f} with "
                f"{card.evaluation.describe()}, threshold {threshold:g} (scored once, decides "
                f"nothing)"
            )
        return version, decision, card

    def _log_roc(
        self, run_id: str, accumulator: MetricAccumulator, metrics: dict[str, float], split: str
    ) -> None:
        fpr, tpr = accumulator.roc()
        roc = {"split": split, "auc": metrics[f"{split}/auc"], "fpr": fpr.tolist()}
        self.tracker.log_text(run_id, json.dumps({**roc, "tpr": tpr.tolist()}), ROC_ARTIFACT)


def _best(cands: list[Candidate], key: str, maximize: bool) -> Candidate:
    finite = [c for c in cands if math.isfinite(c.validation.get(key, math.nan))] or cands
    pick = max if maximize else min
    return pick(finite, key=lambda c: c.validation.get(key, math.nan))
