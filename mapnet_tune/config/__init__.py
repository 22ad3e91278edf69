"""Study files (``studies/*.yaml``) parsed once into frozen, validated config objects.

The shipped study files are package data (``mapnet_tune/studies/``; the checkout's top-level
``studies`` is a link to it), so an installed copy finds them as well as a checkout does.

A study file is data, never code: it is read with ``yaml.safe_load`` and validated by the
pydantic models below (strict types, unknown keys rejected), so a typo fails at start with the
key's name instead of silently falling back to a default. A ``null`` section is an empty one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mapnet_tune.config.base import (
    EVAL_PROTOCOLS,
    Model,
    Options,
    PositiveFloat,
    PositiveInt,
    error,
    first_problem,
    null_is_empty,
    one_of,
)
from mapnet_tune.config.retrain import DEFAULT_RECIPE, RESOLUTIONS, RecipeConfig, RetrainConfig
from mapnet_tune.config.space import ADDED_LATER, HYPERPARAMETERS, ParamSpec, SearchSpace
from mapnet_tune.errors import UserError

#: The shipped study files. pip installs the package as plain files (not zipped), so
#: this is a real directory in a regular install and in an editable one alike.
STUDIES_DIR = Path(__file__).resolve().parent.parent / "studies"
SAMPLERS = ("tpe", "gp", "random", "cmaes")
PRUNERS = ("hyperband", "median", "none")
DIRECTIONS = ("maximize", "minimize")


class DatasetConfig(Model):
    """Which dataset a study trains on and how it is prepared."""

    name: str
    source: str | None = None
    options: Options = Field(default_factory=dict)


class ModelConfig(Model):
    """MAP-Net construction options (width 1.0 and BN momentum 0.01 are the faithful model).

    The official BatchNorm momentum (0.01 in PyTorch's convention) needs hundreds of steps
    before the running statistics used at evaluation settle; short CPU studies raise it.
    """

    width: PositiveFloat = 1.0
    head_interpolation: Annotated[str, one_of(("legacy", "pytorch"))] = "legacy"
    bn_momentum: Annotated[float, Field(gt=0, le=1)] = 0.01


class TrainConfig(Model):
    """Fixed training and validation settings shared by every trial of a study.

    ``precise_bn_batches`` > 0 re-estimates the BatchNorm running statistics over that many
    training batches before each validation, so that trials of few steps (large batches, small
    sets) are not scored on statistics still near their initial values; 0 keeps the running
    averages of training.
    """

    epochs: PositiveInt = 10
    max_minutes: PositiveFloat | None = None
    steps_per_epoch: PositiveInt | None = None
    eval_protocol: Annotated[str, one_of(EVAL_PROTOCOLS)] = "full-image"
    eval_stride: PositiveInt = 16
    eval_batch_size: PositiveInt = 64
    precise_bn_batches: Annotated[int, Field(ge=0)] = 0


class ObjectiveConfig(Model):
    """The metric Optuna optimises and its direction."""

    metric: str = "val/iou"
    direction: Annotated[str, one_of(DIRECTIONS)] = "maximize"

    @field_validator("metric")
    @classmethod
    def _has_split(cls, metric: str) -> str:
        if "/" not in metric:
            raise ValueError("must look like 'val/iou'")
        return metric


class SamplerConfig(Model):
    """Optuna sampler; the seed makes a study's suggestions reproducible.

    ``n_startup_trials`` random trials come before TPE, the GP or CMA-ES model the objective;
    random search ignores it.
    """

    name: Annotated[str, one_of(SAMPLERS)] = "tpe"
    seed: int = 0
    n_startup_trials: int = 10


class PrunerConfig(Model):
    """Optuna pruner. Resources are epochs."""

    name: Annotated[str, one_of(PRUNERS)] = "hyperband"
    min_resource: int = 1
    reduction_factor: int = 3
    n_warmup_steps: int = 1


class StudyConfig(Model):
    """A whole study file, validated (``path`` is where it came from, not a key of the file)."""

    path: str = ""
    dataset: DatasetConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    #: Every hyperparameter in :data:`HYPERPARAMETERS` order, from the file's ``search_space``.
    space: Annotated[
        tuple[ParamSpec, ...],
        BeforeValidator(lambda raw: tuple(dict(SearchSpace.model_validate(raw)).values())),
    ] = Field(default_factory=dict, validation_alias="search_space", validate_default=True)
    retrain: RetrainConfig = RetrainConfig()

    _null_sections = field_validator("*", mode="before")(null_is_empty)

    @model_validator(mode="after")
    def _sampler_fits_space(self) -> StudyConfig:
        # CMA-ES samples a continuous vector; Optuna would draw a categorical at random behind
        # the user's back, so the study file has to say what it wants instead.
        if self.sampler.name == "cmaes":
            for p in self.space:
                if p.kind == "categorical" and len(set(p.choices)) > 1:
                    raise error(
                        f"is 'cmaes', which cannot sample the categorical search_space."
                        f"{p.name}; give {p.name} as a range ({{low, high, int: true}} for "
                        f"integers) or one value, or use sampler tpe, gp or random",
                        "sampler.name",
                    )
        return self

    @classmethod
    def _file_keys(cls) -> set[str]:
        return super()._file_keys() - {"path"}

    def param(self, name: str) -> ParamSpec:
        """The spec of one hyperparameter by name."""
        return next(p for p in self.space if p.name == name)

    def fixed_settings(self) -> dict[str, Any]:
        """Every non-sampled setting, flattened to ``section.key`` for logging."""
        out: dict[str, Any] = {"dataset.name": self.dataset.name}
        out |= {f"dataset.{key}": value for key, value in sorted(self.dataset.options.items())}
        for section in ("model", "train", "objective", "sampler", "pruner"):
            out |= {f"{section}.{k}": v for k, v in getattr(self, section).model_dump().items()}
        return out | {f"fixed.{p.name}": p.value for p in self.space if not p.searched}

    def digest(self) -> str:
        """A short hash of everything that makes trials comparable.

        Neither the file's path nor the retrain section counts: retraining settings may be
        tuned after a search without splitting its study. The payload is the one the former
        dataclasses gave (``asdict``), so that existing studies keep their digest.
        """
        payload = self.model_dump(exclude={"path", "retrain"})
        payload["space"] = [
            p
            for p in payload["space"]
            if not (
                p["name"] in ADDED_LATER
                and p["kind"] == "fixed"
                and p["value"] == HYPERPARAMETERS[p["name"]]
            )
        ]
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _where(path: str, key: str) -> str:
    return f"study file {path}: key '{key}'" if key else f"study file {path}"


def parse_study(raw: Any, path: str) -> StudyConfig:
    """Validate a loaded study mapping.

    Args:
        raw: The YAML document as loaded by ``yaml.safe_load``.
        path: Where it came from, for error messages.

    Returns:
        The frozen config.

    Raises:
        UserError: Naming the first bad key and what is expected there, on one line.
    """
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        key, problem = first_problem(exc)
        raise UserError(f"{_where(path, key)} {problem}") from None
    return study.model_copy(update={"path": path})


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study file.

    Raises:
        UserError: When the file is missing, is not YAML, or has a bad key.
    """
    path = Path(path)
    raw = read_yaml(
        path, "study file", f"pass --config with an existing file (examples are in {STUDIES_DIR})"
    )
    return parse_study(raw or {}, str(path))


def read_yaml(path: Path, what: str, fix: str) -> Any:
    """Safely load a YAML file a user named (never executes tags).

    Raises:
        UserError: ``"<what> <path> does not exist; <fix>"`` or that it is not valid YAML.
    """
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; {fix}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{what} {path} is not valid YAML: {first}") from None


def default_study_file(dataset: str) -> Path:
    """The shipped study file for a dataset.

    Raises:
        UserError: When there is none, listing the ones that exist.
    """
    path = STUDIES_DIR / f"{dataset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))
        raise UserError(
            f"no study file for dataset '{dataset}' in {STUDIES_DIR}; pass --config "
            f"FILE or use one of: {', '.join(known) or '(none found)'}"
        )
    return path


def check_channels(study: StudyConfig, channels: int) -> None:
    """Reject colour augmentation on a grey dataset, naming the key.

    Raises:
        UserError: When ``hue_shift`` can be non-zero but the input has one channel.
    """
    if channels == 1 and study.param("hue_shift").can_be_nonzero():
        raise UserError(
            f"{_where(study.path, 'search_space.hue_shift')}: hue needs colour input but dataset "
            f"'{study.dataset.name}' gives 1 channel; remove hue_shift or use a colour input mode "
            f"(for DRIVE: dataset.options.input_mode: rgb)"
        )


__all__ = [
    "DEFAULT_RECIPE",
    "HYPERPARAMETERS",
    "RESOLUTIONS",
    "STUDIES_DIR",
    "ParamSpec",
    "RecipeConfig",
    "RetrainConfig",
    "StudyConfig",
    "check_channels",
    "default_study_file",
    "first_problem",
    "load_study",
    "parse_study",
    "read_yaml",
]
