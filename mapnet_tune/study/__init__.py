"""The search stage: an Optuna study whose trials train MAP-Net and log to MLflow.

- ``request``: what a worker is asked to do.
- ``sampling``: the per-trial seeded sampler and the pruner.
- ``objective``: one trial, its MLflow run and its composed epoch callback.
- ``progress``: the status lines a person reads.
- ``recovery``: lost trials re-queued, exact trial counts across workers.
- ``worker``: the work loop, the study and its parent run.
- ``summary``: ranked-trial tables and ``export-best``.
- ``launcher``: one worker process per local GPU slot.
"""
