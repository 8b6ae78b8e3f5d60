"""params.yaml validation: every section rejects unknown keys, wrong types and out-of-range values in one line."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from facemarks.core.params import Params, ParamsError, apply_preset, flatten, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def _sections():
    """(dotted section name, dataclass) for every section and nested section."""
    out = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if sub is not None and dataclasses.is_dataclass(sub):
                out.append((f"{prefix}{f.name}", type(sub)))
                walk(type(sub), f"{prefix}{f.name}.")
    walk(Params, "")
    return out


SECTIONS = _sections()


def _nest(dotted: str, value):
    raw: dict = {}
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return raw


def _one_line_naming(exc: ParamsError, key: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and key in msg, msg


def test_repo_params_file_is_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.data.source == "synthetic"


def test_sections_cover_every_stage():
    names = {s for s, _ in SECTIONS}
    assert {"base", "data", "augment", "encode", "train", "evaluate", "plot"} <= names


@pytest.mark.parametrize("section,cls", SECTIONS, ids=[s for s, _ in SECTIONS])
def test_unknown_key(section, cls):
    with pytest.raises(ParamsError) as err:
        parse_params(_nest(f"{section}.no_such_key", 1))
    _one_line_naming(err.value, f"{section}.no_such_key")
    assert "allowed" in str(err.value)


def _scalar_fields(cls):
    return [f for f in dataclasses.fields(cls) if f.type in ("int", "float", "str", "bool", int, float, str, bool)]


@pytest.mark.parametrize("section,cls", SECTIONS, ids=[s for s, _ in SECTIONS])
def test_wrong_type(section, cls):
    for f in _scalar_fields(cls):
        bad = [1, 2] if f.type in ("str", str) else "not-a-number"
        key = f"{section}.{f.name}"
        with pytest.raises(ParamsError) as err:
            parse_params(_nest(key, bad))
        _one_line_naming(err.value, key)
        assert "wrong type" in str(err.value)


@pytest.mark.parametrize("section,cls", SECTIONS, ids=[s for s, _ in SECTIONS])
def test_out_of_range(section, cls):
    checked = 0
    for f in _scalar_fields(cls):
        m = f.metadata
        key = f"{section}.{f.name}"
        if m.get("hi") is not None:
            bad = m["hi"] * 10 + 1
        elif m.get("choices"):
            bad = "definitely-not-allowed"
        else:
            continue
        if f.type in ("int", int):
            bad = int(bad)
        with pytest.raises(ParamsError) as err:
            parse_params(_nest(key, bad))
        _one_line_naming(err.value, key)
        checked += 1
    if section not in ("data.ibug300w", "data.local"):
        assert checked, f"{section} has no range-checked field"


def test_string_patterns_and_cross_field_rules():
    for raw, key in [
        (_nest("data.ibug300w.sha256", "abc"), "data.ibug300w.sha256"),
        (_nest("data.ibug300w.url", "ftp://x"), "data.ibug300w.url"),
        ({"augment": {"scale_min": 1.2, "scale_max": 1.1}}, "augment.scale_max"),
        ({"augment": {"size": 30}}, "augment.size"),
        ({"data": {"synthetic": {"min_size": 300, "max_size": 200}}}, "data.synthetic.max_size"),
        ({"data": {"source": "local"}}, "data.local.path"),
        ({"train": {"lr": 0}}, "train.lr"),
        ({"train": {"lr": float("nan")}}, "train.lr"),
        ({"train": {"pretrained": 1}}, "train.pretrained"),
    ]:
        with pytest.raises(ParamsError) as err:
            parse_params(raw)
        _one_line_naming(err.value, key)


def test_int_is_accepted_for_float_and_bool_is_not_int():
    assert parse_params({"train": {"lr": 1}}).train.lr == 1.0
    with pytest.raises(ParamsError):
        parse_params({"train": {"batch_size": True}})


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError) as err:
        load_params(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ParamsError):
        load_params(tmp_path / "missing.yaml")


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "presets").glob("*.yaml")))
def test_presets_apply_validate_and_keep_comments(tmp_path, preset):
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    changed = apply_preset(ROOT / "presets" / f"{preset}.yaml", target)
    assert changed
    p = load_params(target)
    flat = flatten(dataclasses.asdict(p))
    for key, value in changed.items():
        assert flat[key] == value
    assert "# facemarks parameters" in target.read_text()


def test_bad_preset_leaves_params_untouched(tmp_path):
    target = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", target)
    before = target.read_text()
    preset = tmp_path / "bad.yaml"
    preset.write_text(yaml.safe_dump({"train": {"lr": -1}}))
    with pytest.raises(ParamsError):
        apply_preset(preset, target)
    assert target.read_text() == before


def test_study_name_and_training_seed():
    p = parse_params({"base": {"study": "budget-v1.2_a"}, "train": {"seed": 7}})
    assert p.base.study == "budget-v1.2_a" and p.train.seed == 7 and p.base.seed == 0
    assert Params().base.study == "" and Params().train.seed == 0
    for key, bad in (("base.study", "has space"), ("base.study", "a/b"), ("train.seed", -1)):
        with pytest.raises(ParamsError) as err:
            parse_params(_nest(key, bad))
        _one_line_naming(err.value, key)


def test_losses_list_is_validated_in_one_line():
    assert Params().train.losses == ("mse", "bce") and load_params(ROOT / "params.yaml").train.losses == ("mse", "bce")
    assert parse_params({"train": {"losses": ["mse", "bce", "awing"]}}).train.losses == ("mse", "bce", "awing")
    assert parse_params({"train": {"losses": ["awing"]}}).train.losses == ("awing",)
    for bad, words in (([], "is empty"), (["mse", "mse"], "more than once"), (["mse", "l1"], "'l1' not allowed"),
                       ("mse", "wrong type"), ([1], "wrong type"), (None, "wrong type")):
        with pytest.raises(ParamsError) as err:
            parse_params({"train": {"losses": bad}})
        _one_line_naming(err.value, "train.losses")
        assert words in str(err.value), str(err.value)


def test_loss_names_are_the_models_losses():
    from facemarks.training.model import LOSSES
    from facemarks.core.params import LOSS_NAMES

    assert LOSS_NAMES == LOSSES


def test_train_stage_lists_every_train_key_but_losses():
    """train@<loss> must not rerun when only train.losses changes, and must rerun for every other train.* key: its
    params in dvc.yaml are exactly the train section minus `losses`, plus base and the encode keys it reads."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    assert stage["foreach"] == "${train.losses}"
    listed = set(stage["do"]["params"])
    train_keys = {f"train.{f.name}" for f in dataclasses.fields(Params().train) if f.name != "losses"}
    assert listed == train_keys | {"base", "encode.sigma", "encode.decoder"}
