"""Model files: the weights plus everything needed to use them the way they were trained."""

from __future__ import annotations

from pathlib import Path

import torch

from mapnet_tune.errors import UserError
from mapnet_tune.model import MAPNet
from mapnet_tune.modelcard import ModelCard

#: Version 2 keeps a :class:`ModelCard`; version 1 kept a loose dict.
FORMAT = "mapnet-tune/2"


def save(path: str | Path, model: torch.nn.Module, card: ModelCard) -> Path:
    """Write a checkpoint atomically.

    Args:
        path: Destination ``.pt`` file.
        model: A MAP-Net (its ``config`` rebuilds it).
        card: What the model is and how to use it (preprocessing, protocol, window, stride).

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        {
            "format": FORMAT,
            "model_config": model.config,
            "state_dict": state,
            "card": card.to_dict(),
        },
        tmp,
    )
    tmp.replace(path)
    return path


def load(path: str | Path) -> tuple[MAPNet, ModelCard]:
    """Rebuild the model from a checkpoint, in eval mode on the CPU.

    Raises:
        UserError: When the file is missing or not a mapnet-tune checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"checkpoint {path} does not exist; pass --checkpoint with a file written "
            f"by mapnet-tune (retrain-best saves one with every model)"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} checkpoint (older ones: retrain-best --force)")
        model = MAPNet(**blob["model_config"])
        model.load_state_dict(blob["state_dict"])
        card = ModelCard.from_dict(blob["card"])
    except Exception as exc:  # torch raises many types for a corrupt file
        raise UserError(
            f"checkpoint {path} cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); it must be a "
            f"mapnet-tune checkpoint"
        ) from None
    return model.eval(), card
