"""params.yaml errors stop the run with a message naming the key and the fix."""

import pytest
import yaml

from covipal.config import ConfigError, load_params, parse_params

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_repository_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.pruning.reserve_ratio == 0.25
    assert params.targets.guide_layer < params.model.reference.text_layers


@pytest.mark.parametrize("raw, key, fix", [
    ({"data": {"sizez": {"train": 3}}}, "data.sizez", "remove it"),
    ({"base": {"steps": "many"}}, "base.steps", "valid integer"),
    ({"pruning": {"reserve_ratio": 0}}, "pruning.reserve_ratio", "greater than 0"),
    ({"pruning": {"reserve_ratio": 1.5}}, "pruning.reserve_ratio", "less than or equal to 1"),
    ({"evaluate": {"ratios": [0.5, 2.0]}}, "evaluate", "outside (0, 1]"),
    ({"evaluate": {"rows": 0}}, "evaluate.rows", "allowed range"),
    ({"targets": {"guide_layer": 4}}, "targets.guide_layer", "at most 3"),
    ({"base": {"grounding_layer": 4}}, "base.grounding_layer", "at most 3"),
    ({"base": {"grounding_heads": {"position": 2}}}, "base.grounding_heads", "at most 1"),
    ({"base": {"grounding_heads": {"smell": 1}}}, "base.grounding_heads", "listed values"),
    ({"data": {"source": "./no/such/folder"}}, "data.source", "does not exist"),
    ({"data": {"image": {"question_types": ["colour", "smell"]}}}, "data.image.question_types", "listed values"),
    ({"data": {"image": {"digits": 99}}}, "image.digits", "fit in grid"),
    ({"data": {"follow_up_weights": {"count": -1}}}, "data", "must be >= 0"),
    ({"data": {"follow_up_weights": {"colour": 0, "presence": 0, "count": 0, "relation": 0}}}, "data",
     "no video question type"),
    ({"profile": {"repeat": 3}}, "profile.repeat", "remove it"),
    ({"profile": {"ratios": [0.25, 0]}}, "profile", "outside (0, 1]"),
    ({"profile": {"device": "tpu"}}, "profile.device", "listed values"),
    ({"ops": {"stage_retires": 2}}, "ops.stage_retires", "remove it"),
    ({"data": {"columns": {"image": "img"}}}, "data.columns.image", "remove it"),
    ({"data": {"columns": {"images": "x", "question": "x"}}}, "data.columns", "more than one field"),
    ({"data": {"columns": {"images": "image"}}}, "data", "source is the digit world"),
    ({"model": {"prompt": "Answer briefly."}}, "model.prompt", "must contain {question}"),
    ({"model": {"prompt": "{question} {context}"}}, "model.prompt", "no other field"),
    ({"model": {"prompt": "{question} {"}}, "model.prompt", "literal brace"),
])
def test_bad_values_name_key_and_fix(raw, key, fix):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert key in str(err.value) and fix in str(err.value)


def test_new_keys_default_to_the_digit_world_and_take_templates():
    params = load_params(ROOT / "params.yaml")
    assert params.model.prompt == "{question}" and all(v is None for v in vars(params.data.columns).values())
    wrapped = parse_params({"model": {"prompt": "{question}\nAnswer in one word, {{no more}}."},
                            "data": {"source": "org/vqa", "columns": {"images": "image", "answer": "answers"}}})
    assert wrapped.model.prompt.format(question="why") == "why\nAnswer in one word, {no more}."
    assert wrapped.data.columns.images == "image" and wrapped.data.columns.question is None


def test_guide_layer_checked_against_a_known_depth():
    params = parse_params({"model": {"source": "org/some-lvlm"}, "targets": {"guide_layer": 20}})
    with pytest.raises(ConfigError, match="beyond the model's depth"):
        params.check(text_layers=16)
    assert params.check(text_layers=28) is params


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_params(tmp_path / "params.yaml")
