import json

import pytest

from compress import recipe
from compress.errors import RecipeError


def test_embedded_example_is_valid_and_complete():
    r = recipe.load(None)
    assert r.teacher.source == "example:minilm"
    assert [name for name, _ in r.stage_plan()] == ["distill", "export", "quantize"]
    assert list(r.targets.selected()) == ["cpu"]


def test_export_is_inserted_and_order_fixed():
    r = recipe.parse({"stages": [{"quantize": {}}, {"distill": {"epochs": 1}}]})
    assert [name for name, _ in r.stage_plan()] == ["distill", "export", "quantize"]


def test_schema_has_descriptions_for_every_field():
    s = recipe.schema()
    json.dumps(s)
    for name, defn in s["$defs"].items():
        for field, prop in defn.get("properties", {}).items():
            assert prop.get("description"), f"{name}.{field} has no description"


@pytest.mark.parametrize("data,pattern", [
    ({"teacher": {"sorce": "x"}}, r"unknown field 'sorce' in teacher"),
    ({"stages": [{"prune2": {}}]}, r"stages\[0\]: unknown stage 'prune2' \(known: distill, prune, export, fuse, quantize\)"),
    ({"targets": {"jetsn": {}}}, r"targets: unknown target 'jetsn' \(known: cpu\)"),
    ({"stages": [{"distill": {"epochs": "many"}}]}, r"stages\[0\]\.distill\.epochs: .*integer.*'many'"),
    ({"stages": [{"distill": {}}, {"distill": {}}]}, r"'distill' appears twice"),
    ({"gates": {"retention": 0}}, r"gates\.retention: .*greater than 0"),
    ([1, 2], r"must be a YAML mapping"),
])
def test_errors_are_one_line_naming_the_field(data, pattern):
    with pytest.raises(RecipeError, match=pattern) as info:
        recipe.parse(data)
    assert "\n" not in str(info.value)


def test_malformed_yaml_gives_line(tmp_path):
    p = tmp_path / "compress.yaml"
    p.write_text("teacher:\n  source: [unclosed\n")
    with pytest.raises(RecipeError, match=r"malformed YAML at line \d+"):
        recipe.load(p)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        recipe.load(tmp_path / "nope.yaml")


def test_extra_train_is_unlabelled_text():
    from compress.errors import RecipeError
    from compress.recipe import parse

    parse({"data": {"extra_train": [{"source": "more.txt"}]}})
    with pytest.raises(RecipeError, match=r"data.extra_train\[0\].label_field: extra_train inputs are unlabelled"):
        parse({"data": {"extra_train": [{"source": "more.jsonl", "field": "t", "label_field": "y"}]}})
    with pytest.raises(RecipeError, match=r"data.extra_train\[0\]: x.npz holds images"):
        parse({"data": {"extra_train": [{"source": "x.npz"}]}})


@pytest.mark.parametrize("data,pattern", [
    ({"stages": [{"distill": {"student": {"hidden": 0}}}]},
     r"stages\[0\]\.distill\.student\.hidden: .*greater than or equal to 1"),
    ({"stages": [{"distill": {"student": {"hidden": 8.5}}}]}, r"stages\[0\]\.distill\.student\.hidden: .*integer"),
    ({"task": "classification", "teacher": {"source": "example:minilm-polarity"},
      "data": {"eval": [{"source": "example:polarity-test"}]}, "stages": [{"distill": {"student": {"hidden": 192}}}]},
     r"student\.hidden: a narrower hidden width is implemented for task embedding only, not classification"),
    ({"task": "image-classification", "teacher": {"source": "example:efficientnet-lite0-fashion"},
      "data": {"train": {"source": "example:fashion-mnist-train"}, "eval": [{"source": "example:fashion-mnist-test"}]},
      "stages": [{"distill": {"student": {"hidden": 16}}}]},
     r"student\.hidden: a narrower hidden width is implemented for task embedding only"),
    ({"task": "causal-lm", "teacher": {"source": "hf:lm"}, "stages": [{"distill": {"student": {"hidden": 16}}}]},
     r"student\.hidden: a narrower hidden width is implemented for task embedding only"),
])
def test_student_hidden_errors(data, pattern):
    with pytest.raises(RecipeError, match=pattern) as info:
        recipe.parse(data)
    assert "\n" not in str(info.value)


def test_student_hidden_is_in_the_schema_and_parses():
    r = recipe.parse({"stages": [{"distill": {"student": {"hidden": 192, "heads": 0.25}}}]})
    assert r.stage_plan()[0][1].student.hidden == 192
    props = recipe.schema()["$defs"]["StudentConfig"]["properties"]
    assert "hidden" in props and "teacher's" in props["hidden"]["description"]


def test_a_full_recipe_dump_parses_back():
    """compress bench re-reads the recipe a report stores, with every field written out."""
    from compress.recipe import parse

    for data in ({}, {"stages": [{"distill": {"losses": ["feature", "self"]}}]},
                 {"stages": [{"distill": {"losses": ["feature", "self"], "generations": 3}}]}):
        r = parse(data)
        assert parse(r.model_dump(mode="json", exclude_none=True)) == r  # as report.json stores it
@pytest.mark.parametrize("student,pattern", [
    ({"config": {"hidden_size": 16}, "hidden": 16}, r"stages\[0\]\.distill\.student: config gives the student's shape"
                                                    r" itself; drop hidden, heads and ffn .*pick one way"),
    ({"config": {"hidden_size": 16}, "heads": 0.5}, r"drop hidden, heads and ffn"),
    ({"config": {"hidden_size": 16}, "ffn": 0.5}, r"drop hidden, heads and ffn"),
    ({"config": {"hidden_size": 30, "num_attention_heads": 4}},
     r"student\.config: hidden_size 30 is not divisible by num_attention_heads 4; pick a multiple of 4"),
    ({"config": {"num_hidden_layers": 0}}, r"student\.config: num_hidden_layers must be an integer >= 1, got 0"),
    ({"config": [16]}, r"student\.config: must be a mapping of Hugging Face config fields .* or the path of a config"),
    ({"config": ""}, r"student\.config: is an empty path"),
])
def test_student_config_errors(student, pattern):
    with pytest.raises(RecipeError, match=pattern) as info:
        recipe.parse({"stages": [{"distill": {"student": student}}]})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("data", [
    {"task": "image-classification", "teacher": {"source": "example:efficientnet-lite0-fashion"},
     "data": {"train": {"source": "example:fashion-mnist-train"}, "eval": [{"source": "example:fashion-mnist-test"}]},
     "stages": [{"distill": {"student": {"config": {"hidden_size": 16}}}}]},
    {"task": "causal-lm", "teacher": {"source": "hf:lm"}, "stages": [{"distill": {"student": {"config": {}}}}]},
])
def test_student_config_is_embedding_and_classification_only(data):
    with pytest.raises(RecipeError, match=r"student\.config: a student given as a config is implemented for "
                                          r"task(s embedding and classification| embedding only)") as info:
        recipe.parse(data)
    assert "\n" not in str(info.value)


def test_student_config_parses_for_classification():
    parsed = recipe.parse({"task": "classification", "teacher": {"source": "example:minilm-polarity"},
                           "data": {"eval": [{"source": "example:polarity-test"}]},
                           "stages": [{"distill": {"student": {"config": {"num_hidden_layers": 2}},
                                                   "losses": ["logit"]}}]})
    assert parsed.stages[0].distill.student.config == {"num_hidden_layers": 2}


def test_student_config_parses_and_is_in_the_schema():
    fields = {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024}
    r = recipe.parse({"stages": [{"distill": {"student": {"config": fields, "layers": [2, 5, 8, 11]}}}]})
    assert r.stage_plan()[0][1].student.config == fields
    # the defaults of ffn and heads (or ffn 0) are not a second way; a report's recipe spells them out
    spelled = r.stage_plan()[0][1].student.model_dump(mode="json", exclude_none=True)  # as report.json keeps it
    assert spelled["ffn"] == 0.35
    again = recipe.parse({"stages": [{"distill": {"student": spelled}}]})
    assert again.stage_plan()[0][1].student.config == fields
    recipe.parse({"stages": [{"distill": {"student": {"config": "student/config.json", "ffn": 0}}}]})
    props = recipe.schema()["$defs"]["StudentConfig"]["properties"]
    assert "config" in props and "config.json" in props["config"]["description"]
