"""The ``mapnet-tune`` command line. Each command parses options and calls one function.

Commands live by pipeline stage: ``data`` (prepare), ``study`` (search, status, export-best),
``model`` (retrain-best, evaluate, predict, report) and ``browse`` (ui, dashboard).
"""

from __future__ import annotations

import click

from mapnet_tune.cli import browse, data, model, study
from mapnet_tune.errors import UserError


class _Group(click.Group):
    """Turns a UserError into one line on stderr and exit status 2, without a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo(
                "interrupted: finished trials are kept; run the same command to resume", err=True
            )
            ctx.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="mapnet-tune")
def main() -> None:
    """Hyperparameter search and experiment tracking for MAP-Net segmentation."""


for _command in (
    data.prepare,
    study.search,
    study.status,
    study.export_best,
    browse.ui,
    browse.dashboard,
    model.evaluate,
    model.retrain_best,
    model.predict,
    model.report,
):
    main.add_command(_command)
