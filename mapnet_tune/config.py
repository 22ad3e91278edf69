"""Study files (``studies/*.yaml``) parsed once into frozen, validated config objects.

The shipped study files are package data (``mapnet_tune/studies/``; the checkout's top-level
``studies`` is a link to it), so an installed copy finds them as well as a checkout does.

A study file is data, never code: it is read with ``yaml.safe_load`` and every key is
checked against the schema below, so a typo fails at start with the key's name instead of
silently falling back to a default.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mapnet_tune.errors import UserError

#: The shipped study files. pip installs the package as plain files (not zipped), so
#: this is a real directory in a regular install and in an editable one alike.
STUDIES_DIR = Path(__file__).resolve().parent / "studies"

#: Hyperparameters a study may search or fix, with the value used when a file leaves one out.
#: Augmentation defaults to off so that a study only augments what it asks for.
HYPERPARAMETERS: dict[str, float | int] = {
    "lr": 1e-3,
    "batch_size": 4,
    "pos_weight": 1.0,
    "flip_p": 0.0,
    "rot90_p": 0.0,
    "hue_shift": 0,
    "brightness": 0.0,
    "contrast": 0.0,
}
EVAL_PROTOCOLS = ("patches", "full-image", "sliding-window")
SAMPLERS = ("tpe", "random")
PRUNERS = ("hyperband", "median", "none")
DIRECTIONS = ("maximize", "minimize")


@dataclass(frozen=True)
class DatasetConfig:
    """Which dataset a study trains on and how it is prepared."""

    name: str
    source: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    """MAP-Net construction options (width 1.0 and BN momentum 0.01 are the faithful model).

    The official BatchNorm momentum (0.01 in PyTorch's convention) needs hundreds of steps
    before the running statistics used at evaluation settle; short CPU studies raise it.
    """

    width: float = 1.0
    head_interpolation: str = "legacy"
    bn_momentum: float = 0.01


@dataclass(frozen=True)
class TrainConfig:
    """Fixed training and validation settings shared by every trial of a study.

    ``precise_bn_batches`` > 0 re-estimates the BatchNorm running statistics over that many
    training batches before each validation, so that trials of few steps (large batches, small
    sets) are not scored on statistics still near their initial values; 0 keeps the running
    averages of training.
    """

    epochs: int = 10
    max_minutes: float | None = None
    steps_per_epoch: int | None = None
    eval_protocol: str = "full-image"
    eval_stride: int = 16
    eval_batch_size: int = 64
    precise_bn_batches: int = 0


@dataclass(frozen=True)
class ObjectiveConfig:
    """The metric Optuna optimises and its direction."""

    metric: str = "val/iou"
    direction: str = "maximize"


@dataclass(frozen=True)
class SamplerConfig:
    """Optuna sampler; the seed makes a study's suggestions reproducible."""

    name: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 10


@dataclass(frozen=True)
class PrunerConfig:
    """Optuna pruner. Resources are epochs."""

    name: str = "hyperband"
    min_resource: int = 1
    reduction_factor: int = 3
    n_warmup_steps: int = 1


@dataclass(frozen=True)
class ParamSpec:
    """One hyperparameter: either a fixed value or a range/choices to sample from."""

    name: str
    kind: str  # "fixed", "float", "int" or "categorical"
    value: float | int | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def searched(self) -> bool:
        """True when trials sample this parameter."""
        return self.kind != "fixed"

    def can_be_nonzero(self) -> bool:
        """True when some trial could use a non-zero value (used to reject hue on grey)."""
        if self.kind == "fixed":
            return bool(self.value)
        if self.kind == "categorical":
            return any(bool(c) for c in self.choices)
        return bool(self.low) or bool(self.high)


#: How retrain-best trains: ``full`` on whole images (padded to a square multiple of 16, the loss
#: masked to the real pixels and the FOV) and predicts whole images; ``crop`` on the patches
#: that ``dataset_options`` make, predicting by sliding windows of the patch size.
RESOLUTIONS = ("full", "crop")


@dataclass(frozen=True)
class RecipeConfig:
    """One retraining recipe: what the registered model, and each of its CV folds, trains with.

    Attributes:
        epochs: Training epochs; the final weights are kept, in the folds as in the registered
            model, so that the cross-validated score estimates the registered model.
        resolution: One of :data:`RESOLUTIONS`.
        dataset_options: Merged over ``dataset.options`` to prepare the retraining data, e.g.
            DRIVE ``{patch_size: 256, patches_per_image: 600}`` or ISIC ``{size: 512}``.
        batch_scale: A trial's batch size is multiplied by this (rounded, at least 1), so that
            larger samples keep the pixels per optimiser step: (64 / 256)^2 for DRIVE crops.
        eval_protocol: ``full-image`` or ``sliding-window`` (windows the size of the training
            patches); by default full-image for ``full`` and sliding-window for ``crop``.
        eval_stride: Sliding-window stride.
        eval_batch_size: Images (full-image) or windows (sliding-window) per forward pass.
        val_every: A fold scores its held-out images every this many epochs (and after the
            last), so its curve shows whether ``epochs`` is enough.
    """

    epochs: int = 20
    resolution: str = "full"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    batch_scale: float = 1.0
    eval_protocol: str | None = None
    eval_stride: int = 16
    eval_batch_size: int = 16
    val_every: int = 5

    @property
    def protocol(self) -> str:
        """The evaluation protocol, explicit or implied by the resolution."""
        if self.eval_protocol is not None:
            return self.eval_protocol
        return "full-image" if self.resolution == "full" else "sliding-window"


#: The name of the recipe that the ``retrain`` section's own keys describe.
DEFAULT_RECIPE = "default"


@dataclass(frozen=True)
class RetrainConfig:
    """How retrain-best trains, validates and registers the chosen configurations.

    Attributes:
        folds: K-fold cross-validation over train + val decides among the candidates and the
            champion gate; 0 trains on train and decides on the val split.
        recipes: ``default`` (the section's own keys) and every named variant (the default
            with the variant's keys over it); ``--recipe`` picks which ones compete.
    """

    folds: int = 0
    recipes: dict[str, RecipeConfig] = field(
        default_factory=lambda: {DEFAULT_RECIPE: RecipeConfig()})


@dataclass(frozen=True)
class StudyConfig:
    """A whole study file, validated."""

    path: str
    dataset: DatasetConfig
    model: ModelConfig
    train: TrainConfig
    objective: ObjectiveConfig
    sampler: SamplerConfig
    pruner: PrunerConfig
    space: tuple[ParamSpec, ...]
    retrain: RetrainConfig

    def param(self, name: str) -> ParamSpec:
        """The spec of one hyperparameter by name."""
        return next(p for p in self.space if p.name == name)

    def fixed_settings(self) -> dict[str, Any]:
        """Every non-sampled setting, flattened to ``section.key`` for logging."""
        out: dict[str, Any] = {"dataset.name": self.dataset.name}
        for key, value in sorted(self.dataset.options.items()):
            out[f"dataset.{key}"] = value
        for section in ("model", "train", "objective", "sampler", "pruner"):
            for key, value in asdict(getattr(self, section)).items():
                out[f"{section}.{key}"] = value
        for p in self.space:
            if not p.searched:
                out[f"fixed.{p.name}"] = p.value
        return out

    def digest(self) -> str:
        """A short hash of everything that makes trials comparable.

        Neither the file's path nor the retrain section counts: retraining settings may be
        tuned after a search without splitting its study.
        """
        payload = {k: v for k, v in asdict(self).items() if k not in ("path", "retrain")}
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _where(path: str, key: str) -> str:
    return f"study file {path}: key '{key}'"


def _check_keys(path: str, prefix: str, raw: dict, allowed: set[str]) -> None:
    if not isinstance(raw, dict):
        raise UserError(f"{_where(path, prefix)} must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise UserError(
            f"{_where(path, key)} is not a known setting; valid keys here: "
            f"{', '.join(sorted(allowed))}"
        )


def _typed(path: str, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    # bool is an int in Python; a YAML `true` where a number belongs is a mistake.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise UserError(f"{_where(path, key)} must be {_kind_name(kind)}, got {value!r}")
    if kind is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, kind):
        raise UserError(f"{_where(path, key)} must be {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string",
                        bool: "true/false", dict: "a mapping", list: "a list",
                        type(None): "null"}[k] for k in kinds)


def _section(path: str, name: str, raw: dict, cls: type, types: dict[str, Any]):
    _check_keys(path, name, raw, set(types))
    values = {k: _typed(path, f"{name}.{k}", v, types[k]) for k, v in raw.items()}
    return cls(**values)


def _choice(path: str, key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UserError(f"{_where(path, key)} is '{value}'; valid values: {', '.join(valid)}")


def _positive(path: str, key: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{_where(path, key)} must be positive, got {value}")


def _non_negative(path: str, key: str, value: float | int) -> None:
    if value < 0:
        raise UserError(f"{_where(path, key)} must be 0 or more, got {value}")


def _param(path: str, name: str, raw: Any) -> ParamSpec:
    key = f"search_space.{name}"
    if not isinstance(raw, dict):
        value = _typed(path, key, raw, (int, float))
        return ParamSpec(name=name, kind="fixed", value=value)
    if "choices" in raw:
        _check_keys(path, key, raw, {"choices"})
        choices = _typed(path, f"{key}.choices", raw["choices"], list)
        if not choices:
            raise UserError(f"{_where(path, key + '.choices')} is an empty list; give at least one")
        for c in choices:
            _typed(path, f"{key}.choices", c, (int, float))
        return ParamSpec(name=name, kind="categorical", choices=tuple(choices))
    _check_keys(path, key, raw, {"low", "high", "log", "int"})
    for needed in ("low", "high"):
        if needed not in raw:
            raise UserError(f"{_where(path, key)} needs '{needed}' (or 'choices')")
    is_int = _typed(path, f"{key}.int", raw.get("int", False), bool)
    kind_type = int if is_int else float
    low = _typed(path, f"{key}.low", raw["low"], kind_type)
    high = _typed(path, f"{key}.high", raw["high"], kind_type)
    log = _typed(path, f"{key}.log", raw.get("log", False), bool)
    if not low < high:
        raise UserError(f"{_where(path, key)} is an empty range: low {low} must be below "
                        f"high {high}")
    if log and low <= 0:
        raise UserError(f"{_where(path, key)} is log-scaled, so low must be positive, got {low}")
    return ParamSpec(name=name, kind="int" if is_int else "float", low=low, high=high, log=log)


def _validate_space(path: str, space: tuple[ParamSpec, ...]) -> None:
    bounds = {"flip_p": (0, 1), "rot90_p": (0, 1), "brightness": (0, 1), "contrast": (0, 1),
              "hue_shift": (0, 180), "lr": (0, math.inf), "pos_weight": (0, math.inf),
              "batch_size": (1, math.inf)}
    for p in space:
        lo, hi = bounds[p.name]
        values = [p.value] if p.kind == "fixed" else list(p.choices) or [p.low, p.high]
        for v in values:
            if not lo <= v <= hi or (p.name in ("lr", "pos_weight") and v <= 0):
                raise UserError(
                    f"{_where(path, 'search_space.' + p.name)} has value {v} outside its valid "
                    f"range [{lo}, {hi}]"
                )
        if p.name == "batch_size" and any(float(v) != int(v) for v in values):
            raise UserError(f"{_where(path, 'search_space.batch_size')} must hold integers")


def parse_study(raw: Any, path: str) -> StudyConfig:
    """Validate a loaded study mapping.

    Args:
        raw: The YAML document as loaded by ``yaml.safe_load``.
        path: Where it came from, for error messages.

    Returns:
        The frozen config.

    Raises:
        UserError: Naming the first bad key and what is expected there.
    """
    sections = {"dataset", "model", "train", "objective", "sampler", "pruner", "search_space",
                "retrain"}
    _check_keys(path, "", raw, sections)
    if "dataset" not in raw:
        raise UserError(f"{_where(path, 'dataset')} is required (e.g. dataset: {{name: drive}})")
    ds = raw["dataset"]
    _check_keys(path, "dataset", ds, {"name", "source", "options"})
    dataset = DatasetConfig(
        name=_typed(path, "dataset.name", ds.get("name"), str),
        source=_typed(path, "dataset.source", ds.get("source"), (str, type(None))),
        options=_typed(path, "dataset.options", ds.get("options") or {}, dict),
    )
    model = _section(path, "model", raw.get("model") or {}, ModelConfig,
                     {"width": float, "head_interpolation": str, "bn_momentum": float})
    _positive(path, "model.width", model.width)
    if not 0 < model.bn_momentum <= 1:
        raise UserError(f"{_where(path, 'model.bn_momentum')} must be in (0, 1], "
                        f"got {model.bn_momentum}")
    _choice(path, "model.head_interpolation", model.head_interpolation, ("legacy", "pytorch"))
    train = _section(path, "train", raw.get("train") or {}, TrainConfig,
                     {"epochs": int, "max_minutes": (float, type(None)),
                      "steps_per_epoch": (int, type(None)), "eval_protocol": str,
                      "eval_stride": int, "eval_batch_size": int, "precise_bn_batches": int})
    for key in ("epochs", "max_minutes", "steps_per_epoch", "eval_stride", "eval_batch_size"):
        _positive(path, f"train.{key}", getattr(train, key))
    _non_negative(path, "train.precise_bn_batches", train.precise_bn_batches)
    _choice(path, "train.eval_protocol", train.eval_protocol, EVAL_PROTOCOLS)
    objective = _section(path, "objective", raw.get("objective") or {}, ObjectiveConfig,
                         {"metric": str, "direction": str})
    _choice(path, "objective.direction", objective.direction, DIRECTIONS)
    if "/" not in objective.metric:
        raise UserError(f"{_where(path, 'objective.metric')} must look like 'val/iou'")
    sampler = _section(path, "sampler", raw.get("sampler") or {}, SamplerConfig,
                       {"name": str, "seed": int, "n_startup_trials": int})
    _choice(path, "sampler.name", sampler.name, SAMPLERS)
    pruner = _section(path, "pruner", raw.get("pruner") or {}, PrunerConfig,
                      {"name": str, "min_resource": int, "reduction_factor": int,
                       "n_warmup_steps": int})
    _choice(path, "pruner.name", pruner.name, PRUNERS)
    raw_space = raw.get("search_space") or {}
    _check_keys(path, "search_space", raw_space, set(HYPERPARAMETERS))
    space = tuple(
        _param(path, name, raw_space[name]) if name in raw_space
        else ParamSpec(name=name, kind="fixed", value=default)
        for name, default in HYPERPARAMETERS.items()
    )
    _validate_space(path, space)
    retrain = _retrain(path, raw.get("retrain") or {})
    return StudyConfig(path=path, dataset=dataset, model=model, train=train, objective=objective,
                       sampler=sampler, pruner=pruner, space=space, retrain=retrain)


_RECIPE_TYPES = {"epochs": int, "resolution": str, "dataset_options": dict,
                 "batch_scale": float, "eval_protocol": (str, type(None)), "eval_stride": int,
                 "eval_batch_size": int, "val_every": int}


def _recipe(path: str, prefix: str, raw: Any, base: dict[str, Any]) -> RecipeConfig:
    """One recipe: ``raw``'s keys over ``base``, checked and named by ``prefix`` in errors."""
    _check_keys(path, prefix, raw, set(_RECIPE_TYPES))
    recipe = _section(path, prefix, {**base, **raw}, RecipeConfig, _RECIPE_TYPES)
    for key in ("epochs", "batch_scale", "eval_stride", "eval_batch_size", "val_every"):
        _positive(path, f"{prefix}.{key}", getattr(recipe, key))
    _choice(path, f"{prefix}.resolution", recipe.resolution, RESOLUTIONS)
    if recipe.eval_protocol is not None:
        # Test images have no patch coordinates: a retrained model is scored on whole images.
        _choice(path, f"{prefix}.eval_protocol", recipe.eval_protocol, EVAL_PROTOCOLS[1:])
        if recipe.resolution == "full" and recipe.eval_protocol != "full-image":
            raise UserError(f"{_where(path, prefix + '.eval_protocol')}: a model trained at "
                            f"resolution full predicts whole images; use full-image, or "
                            f"resolution: crop for sliding windows")
    return recipe


def _retrain(path: str, raw: Any) -> RetrainConfig:
    """The ``retrain`` section: ``folds``, the default recipe's keys, and named ``variants``."""
    _check_keys(path, "retrain", raw, {"folds", "variants", *_RECIPE_TYPES})
    folds = _typed(path, "retrain.folds", raw.get("folds", 0), int)
    if folds == 1 or folds < 0:
        raise UserError(f"{_where(path, 'retrain.folds')} must be 0 (decide on the val split) "
                        f"or at least 2, got {folds}")
    own = {k: v for k, v in raw.items() if k in _RECIPE_TYPES}
    recipes = {DEFAULT_RECIPE: _recipe(path, "retrain", own, {})}
    variants = _typed(path, "retrain.variants", raw.get("variants") or {}, dict)
    for name, body in variants.items():
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum() \
                or name == DEFAULT_RECIPE:
            raise UserError(f"{_where(path, 'retrain.variants')}: '{name}' is not a usable "
                            f"recipe name (letters, digits, - and _; not '{DEFAULT_RECIPE}')")
        recipes[name] = _recipe(path, f"retrain.variants.{name}", body, own)
    return RetrainConfig(folds=folds, recipes=recipes)


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study file.

    Raises:
        UserError: When the file is missing, is not YAML, or has a bad key.
    """
    path = Path(path)
    raw = read_yaml(path, "study file", "pass --config with an existing file (examples are in "
                                        f"{STUDIES_DIR})")
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
        raise UserError(f"no study file for dataset '{dataset}' in {STUDIES_DIR}; pass --config "
                        f"FILE or use one of: {', '.join(known) or '(none found)'}")
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
