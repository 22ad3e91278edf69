"""retrain-best: from a finished study to a registered model whose numbers can be trusted.

The top trials of a study, each with one or more retrain recipes (the study file's
``retrain`` section), are the candidates. Every decision uses validation only:

- With ``folds`` K >= 2 (a study file's ``retrain.folds``, or ``--folds``), each candidate is
  cross-validated over train + val with scikit-learn's ``GroupKFold``, groups (patients)
  shuffled by the study's seed; every fold trains with exactly the recipe of the registered
  model, so the mean estimates that model. The best mean is retrained on all of train + val
  and registered.
- With ``--folds 0``, each candidate trains on train and is scored on val; each is registered.

The registered version then becomes the ``challenger``; the ``champion`` alias moves only to a
version that beats it on the same selection basis (digest): with folds by more than the
standard error of the paired per-fold differences. A champion selected on another basis is
re-run on the current folds (or, with ``--gate refuse``, not compared). The test split is
sealed until registration returns; it is then scored once per registered version and stored
with it for the report: it never enters a decision.

- ``plan``: the request, the candidates, the folds, the checks made before anything is created.
- ``runner``: train, cross-validate, score.
- ``register``: the model card, logging, registering, the champion gate.
- ``selection``: the selection basis and its digest, grouped folds, the paired margin.
- ``rival``: a champion from another basis, rebuilt to be re-run.
- ``sealed``: the guard on the test split.
"""

from mapnet_tune.retrain.plan import RetrainRequest
from mapnet_tune.retrain.register import decide_champion
from mapnet_tune.retrain.runner import retrain_best

__all__ = ["RetrainRequest", "decide_champion", "retrain_best"]
