import pytest

from lrft.errors import UserError
from lrft.recipe import load_recipe, validate_recipe

BASE = {"data": {"path": "x.jsonl"}, "adapter": {"type": "lora", "r": 8}}


def test_valid_recipe_and_defaults():
    r = validate_recipe({**BASE})
    assert r.adapter.r == 8 and r.adapter.scaling == 2.0
    assert r.quantization.bits == 4 and r.model.name_or_path == "smollm2-135m-instruct"
    assert r.resolved()["adapter"]["r"] == 8  # the concrete adapter config is serialised


@pytest.mark.parametrize(
    "data, message",
    [
        ({**BASE, "adapter": {"type": "lora", "lora_rank": 8}}, "adapter.lora_rank: unknown key; did you mean adapter.r?"),
        ({**BASE, "trainig": {}}, "trainig: unknown key; did you mean training?"),
        ({**BASE, "training": {"learning_rat": 1e-4}}, "did you mean training.learning_rate?"),
        ({**BASE, "training": {"max_steps": "many"}}, "training.max_steps:"),
        ({**BASE, "training": {"max_steps": -1}}, "training.max_steps:"),
        ({**BASE, "training": {"batch_size": 6, "micro_batch_size": 4}}, "multiple of training.micro_batch_size"),
        ({**BASE, "adapter": {"type": "lorra"}}, "unknown adapter type 'lorra'; did you mean lora?"),
        ({"adapter": {"type": "lora"}}, "data: required key is missing"),
        ({**BASE, "quantization": {"bits": 3}}, "quantization.bits:"),
        ({**BASE, "data": {"path": "x.jsonl", "format": "alpacca"}}, "(got 'alpacca'); did you mean 'alpaca'?"),
    ],
)
def test_recipe_errors_are_one_line(data, message):
    with pytest.raises(UserError) as err:
        validate_recipe(data)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_overrides_are_typed_by_schema(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {path: x.jsonl}\nadapter: {type: lora}\n")
    r = load_recipe(path, ["training.max_steps=3", "adapter.r=4", "adapter.target_modules=[q_proj,v_proj]", "quantization.bits=none"])
    assert r.training.max_steps == 3 and r.adapter.r == 4
    assert r.adapter.target_modules == ["q_proj", "v_proj"] and r.quantization.bits is None


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  path: [unclosed\n")
    with pytest.raises(UserError, match="line"):
        load_recipe(path)


def test_shipped_recipes_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(path)
