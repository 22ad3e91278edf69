"""retrain-best's printed summaries: the validation table and the registered versions."""

from __future__ import annotations

import math

from mapnet_tune.modelcard import ModelCard
from mapnet_tune.retrain.plan import Candidate, Plan


def test_key(plan: Plan) -> str:
    """The objective on the test split: ``test/iou``."""
    return "test/" + plan.config.objective.metric.split("/", 1)[1]


def validation_table(plan: Plan, candidates: list[Candidate]) -> str:
    """One line per candidate: its selection value and, with folds, the spread."""
    std = plan.selection.removesuffix("_mean") + "_std"
    rows = []
    for c in candidates:
        value = c.validation.get(plan.selection, math.nan)
        spread = f" +- {c.validation[std]:.4f}" if std in c.validation else ""
        rows.append(f"{c.tag}: {plan.selection} {value:.4f}{spread}")
    return "\n".join(rows)


def registered_table(
    plan: Plan, rows: list[tuple[Candidate, str, ModelCard]], aliases: dict[str, tuple[str, ...]]
) -> str:
    """The registered versions with their validation, their single test score and aliases."""
    key = test_key(plan)
    head = [
        "trial",
        "recipe",
        "search " + plan.config.objective.metric,
        plan.selection,
        f"{key} (once, after the decision)",
        "test protocol",
        "version",
        "aliases",
        "mlflow run",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cand, version, card in rows:
        test = f"{card.test[key]:.4f}" if key in card.test else "-"
        protocol = f"{card.evaluation.describe()}, threshold {card.evaluation.threshold:g}"
        lines.append(
            f"| t{cand.trial.number:04d} | {card.recipe} | {cand.trial.value:.4f} | "
            f"{card.selection_value:.4f} | {test} | {protocol} | {version} | "
            f"{', '.join(aliases.get(version, ())) or '-'} | {cand.run_id} |"
        )
    trained = "; ".join(sorted({f"{card.recipe}: {card.training}" for _, _, card in rows}))
    return f"{plan.model_name} ({trained}):\n" + "\n".join(lines)
