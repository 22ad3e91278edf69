"""Scoring a saved model on a dataset split with the dataset's protocol."""

from __future__ import annotations

from mapnet_tune import checkpoint, engine
from mapnet_tune.data import prepare
from mapnet_tune.errors import UserError
from mapnet_tune.metrics import format_header, format_row


def evaluate_checkpoint(path: str, dataset: str, source: str | None, split: str,
                        protocol: str | None, stride: int, device: str | None) -> str:
    """Evaluate a checkpoint and return the printable result.

    The dataset is prepared with the options recorded in the checkpoint, so the model sees
    the preprocessing it was trained with. The protocol defaults to the recorded one.

    Raises:
        UserError: Unknown split, a model trained on another dataset, or bad data.
    """
    model, meta = checkpoint.load(path)
    if meta.get("dataset") not in (None, dataset):
        raise UserError(f"checkpoint {path} was trained on '{meta['dataset']}', not '{dataset}'; "
                        f"pass --dataset {meta['dataset']}")
    data = prepare(dataset, source, meta.get("dataset_options", {}))
    if split not in data.splits:
        raise UserError(f"dataset '{dataset}' has no '{split}' split here (it has "
                        f"{', '.join(data.splits)}); pass --split with one of those")
    protocol = protocol or meta.get("eval_protocol", "full-image")
    dev = engine.pick_device(device)
    metrics = engine.evaluate(engine.prepare_model(model, dev), data.splits[split], protocol,
                              split, device=dev, stride=stride, legacy=True,
                              window=meta.get("patch_size") or 64)
    where = f"stride {stride}" if protocol == "sliding-window" else "whole images"
    return (f"{dataset} {split}: {len(data.splits[split].images)} images, protocol {protocol} "
            f"({where}), dataset fingerprint {data.fingerprint}\n{format_header()}\n"
            + format_row(metrics, split))
