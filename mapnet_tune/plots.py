"""The study's plots as PNG files: optimisation history, parameter importances, coordinates.

The report writes them all; the search logs the first two to the study's parent run when
the study completes. The history shows only the trials this study ran: trials copied in by
``search --warm-start`` would start its best-so-far line at the earlier study's best. The
importances and coordinates keep them, since they describe the same objective.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import matplotlib

# No display on servers and cluster nodes: draw to files only.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from mapnet_tune.storage import is_warm_start  # noqa: E402
from mapnet_tune.tracking.runs import quiet  # noqa: E402

STUDY_PLOTS: dict[str, Callable[[optuna.Study], Any]] = {
    "optimization_history": optuna_plots.plot_optimization_history,
    "param_importances": optuna_plots.plot_param_importances,
    "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
}
#: The plots drawn from the study's own trials only (see :func:`own_trials`).
OWN_TRIALS_ONLY = frozenset({"optimization_history"})


def own_trials(study: optuna.Study) -> optuna.Study:
    """``study`` without the trials ``search --warm-start`` copied into it, in memory.

    The study itself when it has no copies.
    """
    trials = study.get_trials(deepcopy=False)
    if not any(map(is_warm_start, trials)):
        return study
    with quiet("optuna"):  # a view, not a study of the user's: no "new study created" line
        own = optuna.create_study(study_name=study.study_name, directions=study.directions)
    own.add_trials([t for t in trials if not is_warm_start(t)])
    return own


def study_plots(
    study: optuna.Study, folder: Path, names: Iterable[str], notes: list[str]
) -> list[str]:
    """Draw the named plots of ``STUDY_PLOTS`` into ``folder``.

    Returns:
        The file names written; a plot the study cannot have yet (importances need two
        completed trials) adds a line to ``notes`` instead.
    """
    written = []
    own = own_trials(study)
    copies = sum(map(is_warm_start, study.get_trials(deepcopy=False)))
    for name in names:
        with warnings.catch_warnings():
            # The matplotlib backend is marked experimental, and small studies warn that
            # importances are uncertain; the figures are still what we want.
            warnings.simplefilter("ignore")
            try:
                axes = STUDY_PLOTS[name](own if name in OWN_TRIALS_ONLY else study)
            except (ValueError, RuntimeError) as exc:
                notes.append(f"no {name.replace('_', ' ')} plot: {exc}")
                continue
        figure = (axes if hasattr(axes, "figure") else axes.flat[0]).figure
        figure.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(f"{name}.png")
        if copies and name in OWN_TRIALS_ONLY:
            notes.append(
                f"the {name.replace('_', ' ')} plot leaves out the {copies} trial(s) copied by "
                "--warm-start"
            )
    return written
