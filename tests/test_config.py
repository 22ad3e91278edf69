"""Study files: the shipped ones load, and bad ones fail naming the key."""

import pytest
import yaml

from mapnet_tune.config import STUDIES_DIR, check_channels, load_study, parse_study
from mapnet_tune.errors import UserError


@pytest.mark.parametrize("name", ["drive", "isic", "lung", "synthetic"])
def test_shipped_study_files_load(name):
    study = load_study(STUDIES_DIR / f"{name}.yaml")
    assert study.dataset.name == name
    assert study.objective.metric == "val/iou" and study.objective.direction == "maximize"
    assert study.sampler.name == "tpe" and study.pruner.name == "hyperband"
    searched = {p.name for p in study.space if p.searched}
    assert {"lr", "batch_size", "pos_weight", "flip_p", "rot90_p"} <= searched
    assert study.param("lr").log


def _base(**overrides):
    doc = {
        "dataset": {"name": "synthetic"},
        "search_space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}},
    }
    doc.update(overrides)
    return doc


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (_base(trian={"epochs": 2}), "key 'trian'"),
        (_base(train={"epochs": "ten"}), "key 'train.epochs' must be an integer"),
        (_base(train={"epoch": 3}), "key 'train.epoch' is not a known setting"),
        (_base(search_space={"lr": {"low": 1e-2, "high": 1e-4}}), "'search_space.lr' is an empty"),
        (_base(search_space={"batch_size": {"choices": []}}), "search_space.batch_size.choices"),
        (_base(search_space={"learning_rate": 0.1}), "key 'search_space.learning_rate'"),
        (_base(search_space={"flip_p": {"low": 0.0, "high": 1.5}}), "search_space.flip_p"),
        (_base(train={"eval_protocol": "tiles"}), "valid values: patches, full-image"),
        (_base(pruner={"name": "asha"}), "key 'pruner.name'"),
        ({"search_space": {}}, "key 'dataset' is required"),
    ],
)
def test_bad_study_file_names_the_key(doc, needle):
    with pytest.raises(UserError) as err:
        parse_study(doc, "bad.yaml")
    assert needle in str(err.value)
    assert "bad.yaml" in str(err.value)


def test_hue_on_grey_input_is_rejected():
    study = parse_study(
        _base(search_space={"hue_shift": {"low": 0, "high": 10, "int": True}}), "grey.yaml"
    )
    with pytest.raises(UserError, match="search_space.hue_shift"):
        check_channels(study, channels=1)
    check_channels(study, channels=3)


def test_fixed_values_and_defaults():
    study = parse_study(_base(search_space={"lr": 0.001, "batch_size": 8}), "f.yaml")
    assert not study.param("lr").searched and study.param("batch_size").value == 8
    assert study.param("hue_shift").value == 0  # augmentation is off unless asked for
    assert study.fixed_settings()["fixed.batch_size"] == 8


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("dataset: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_study(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_study(tmp_path / "nope.yaml")


def test_study_files_cannot_run_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("dataset: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError):
        load_study(evil)


def test_digest_changes_with_settings():
    a = parse_study(_base(), "a.yaml")
    b = parse_study(_base(train={"epochs": 3}), "a.yaml")
    assert a.digest() != b.digest()
    assert a.digest() == parse_study(yaml.safe_load(yaml.safe_dump(_base())), "other.yaml").digest()
