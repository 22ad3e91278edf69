"""``prepare``: validate, preprocess and cache a dataset."""

from __future__ import annotations

import click

from mapnet_tune.cli.options import SOURCE, key_values
from mapnet_tune.data import DATASETS


def _datasets_epilog() -> str:
    """Every dataset with its one-line summary and its options, for ``prepare --help``."""
    blocks = []
    for loader in DATASETS.values():
        options = "; ".join(
            f"{name}={opt.default!r}: {opt.help}" for name, opt in loader.options.items()
        )
        blocks.append(f"{loader.name}: {loader.summary}. Options: {options}.")
    return "Datasets (pass options as --option KEY=VALUE):\n\n" + "\n\n".join(blocks)


@click.command(epilog=_datasets_epilog())
@click.option("--dataset", required=True, help=f"One of {', '.join(DATASETS)}.")
@SOURCE
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A preprocessing option, e.g. input_mode=rgb (repeatable).",
)
def prepare(dataset: str, source: str | None, options: tuple[str, ...]) -> None:
    """Validate, preprocess and cache a dataset; print its card."""
    from mapnet_tune.data import prepare as prepare_dataset
    from mapnet_tune.data import remember_source

    data = prepare_dataset(dataset, source, key_values(options))
    if source:
        remember_source(dataset, source)
    click.echo(data.card())
