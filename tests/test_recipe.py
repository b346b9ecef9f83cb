"""Recipe validation: each kind of mistake gets its own sentence with file:line and exit code 2, via the CLI."""

import pytest
import yaml
from conftest import DEMO_RECIPE, ROOT, run_cli

from compress.recipe import load_recipe, parse_recipe

GOOD = """\
name: t
model: builtin:tiny-phi4-mini
gates:
  max_kld: 0.05
variants:
  - name: a
    method: gptq
    bits: 4
    group_size: 128
"""

MISTAKES = [
    # (description, replace this, with this, expected message)
    ("bits out of range", "bits: 4", "bits: 7", "recipe.yaml:8: variants[0].bits: must be one of 2, 3, 4, 5, 6, 8"),
    ("unknown key", "bits: 4", "bits: 4\n    colour: red", "recipe.yaml:9: variants[0].colour: unknown key"),
    ("wrong type", "bits: 4", "bits: four", "recipe.yaml:8: variants[0].bits: input should be a valid integer"),
    ("malformed YAML", "max_kld: 0.05", "max_kld: [0.05", "recipe.yaml:5: not valid YAML"),
    ("missing model", "model: builtin:tiny-phi4-mini\n", "", "recipe.yaml:1: model: required but missing"),
    ("unknown method", "method: gptq", "method: magic", "recipe.yaml:7: variants[0].method: must be one of gptq"),
    ("group size", "group_size: 128", "group_size: 100", "recipe.yaml:9: variants[0].group_size: must be a power of two"),
    ("format for method", "bits: 4", "bits: 4\n    formats: [onnx]", "method gptq cannot write 'onnx'"),
    ("unknown target", "gates:", "targets: {tpu: {required: true}}\ngates:", "recipe.yaml:3: targets: tpu: say which device it is, device: cpu or device: cuda"),
    ("negative gate", "max_kld: 0.05", "max_kld: -1", "recipe.yaml:4: gates.max_kld: input should be greater than or equal to 0"),
    ("empty variants", "variants:\n  - name: a\n    method: gptq\n    bits: 4\n    group_size: 128\n", "variants: []\n",
     "recipe.yaml:5: variants: list at least one variant"),
    ("duplicate names", "    group_size: 128\n", "    group_size: 128\n  - name: a\n    method: gptq\n",
     "variants: variant name 'a' is used twice"),
]


@pytest.mark.parametrize("description, old, new, expected", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_has_its_own_message(description, old, new, expected, write_recipe):
    assert old in GOOD
    path = write_recipe(GOOD.replace(old, new))
    with pytest.raises(ValueError) as caught:
        load_recipe(path)
    assert expected in str(caught.value).replace(str(path.parent) + "/", "")


def test_cli_gives_one_sentence_and_exit_2_without_loading_a_model(write_recipe):
    path = write_recipe(GOOD.replace("bits: 4", "bits: 7"))
    for command in ("validate", "run"):
        result = run_cli(command, str(path))
        assert result.returncode == 2, result.stderr
        output = (result.stdout + result.stderr).strip()
        assert output == f"error: {path}:8: variants[0].bits: must be one of 2, 3, 4, 5, 6, 8"
        assert "Traceback" not in output


def test_cli_refuses_missing_recipe_and_missing_model(tmp_path, write_recipe):
    result = run_cli("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "does not exist" in result.stdout
    path = write_recipe(GOOD.replace("builtin:tiny-phi4-mini", str(tmp_path / "no-model")))
    result = run_cli("run", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.strip() == f"error: model folder {tmp_path / 'no-model'} does not exist"


def test_cli_refuses_a_non_phi3_model_before_loading_weights(tmp_path, write_recipe):
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    path = write_recipe(GOOD.replace("builtin:tiny-phi4-mini", str(model)))
    result = run_cli("run", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "is a LlamaForCausalLM model; compress handles Phi-3-architecture" in result.stdout
    assert not (tmp_path / "out" / "release").exists()


def test_group_size_that_does_not_divide_the_model_is_refused_in_preflight(tmp_path, write_recipe):
    path = write_recipe(GOOD.replace("group_size: 128", "group_size: 256"))
    result = run_cli("run", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "variants[0].group_size: 256 does not divide the model's hidden_size 128" in result.stdout


def test_shipped_recipes_are_valid():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert DEMO_RECIPE in recipes and len(recipes) >= 3
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.variants
    models = {load_recipe(p).model for p in recipes}
    assert {"microsoft/Phi-4-mini-instruct", "microsoft/phi-4"} <= models


def test_per_variant_gates_override_only_what_they_set():
    recipe = parse_recipe(GOOD.replace("group_size: 128", "group_size: 128\n    gates: {max_kld: 0.01}"))
    gates = recipe.gates_for(recipe.variants[0])
    assert gates.max_kld == 0.01
    assert recipe.gates.max_kld == 0.05
    assert yaml.safe_load(GOOD)["gates"]["max_kld"] == 0.05


METHOD_MISTAKES = [
    ("onnx bits", "  - {name: a, method: onnx-int4, bits: 8}", "variants[0]: bits: method onnx-int4 quantizes to 4 bits, not 8"),
    ("onnx block", "  - {name: a, method: onnx-int4, group_size: 512}", "block size must be 16, 32, 64, 128 or 256"),
    ("algorithm", "  - {name: a, method: onnx-int4, algorithm: hqq}", "variants[0].algorithm: must be one of default, rtn, k_quant"),
    ("from missing", "  - {name: a, method: onnx-int4, from: nope}", "r.yaml:4: variants[0].from: no earlier variant is named 'nope'"),
    ("from later", "  - {name: a, method: onnx-int4, from: b}\n  - {name: b, method: gptq}", "no earlier variant is named 'b'"),
    ("from 8-bit", "  - {name: b, method: gptq, bits: 8}\n  - {name: a, method: onnx-int4, from: b}",
     "only 4-bit gptq, awq or rtn weights can go into an ONNX int4 graph"),
    ("from on gptq", "  - {name: a, method: gptq, from: x}", "variants[0]: from: only onnx-int4 and gguf can carry an earlier variant's weights, not gptq"),
    ("from a quantized head, kept float", "  - {name: b, method: gptq, ignore: []}\n"
     "  - {name: a, method: onnx-int4, from: b, ignore: [lm_head]}",
     "variants[1].from: 'b' quantizes lm_head and its ONNX graph carries that head; drop ignore: [lm_head] here"),
    ("gguf from a quantized head", "  - {name: b, method: rtn, ignore: []}\n  - {name: a, method: gguf, from: b}",
     "variants[1].from: 'b' quantizes lm_head, and only a float head is carried into GGUF; give it ignore: [lm_head]"),
    ("gptq folder quantized head", "  - {name: a, method: gptq, ignore: [], formats: [compressed-tensors, gptq]}",
     "formats: gptq and awq folders keep lm_head in floating point"),
    ("awq 8-bit", "  - {name: a, method: rtn, bits: 8, formats: [awq]}", "the awq format holds 4-bit weights only"),
    ("onnx int8 layer", "  - {name: a, method: onnx-int4, overrides: [{match: down_proj, bits: 8}]}",
     "the ONNX builder can keep only lm_head at 8 bits"),
    ("bad override", "  - {name: a, method: gptq, overrides: [{match: '(', bits: 8}]}", "is not a valid regular expression"),
    ("override bits", "  - {name: a, method: gptq, overrides: [{match: x, bits: 5}]}", "variants[0].overrides[0].bits"),
    ("grid on gptq", "  - {name: a, method: gptq, n_grid: 5}", "n_grid: only awq and awq-gptq search a grid"),
    ("mappings on awq-gptq", "  - {name: a, method: awq-gptq, awq_mappings: stock}", "awq_mappings: only awq takes this option"),
    ("unknown mappings", "  - {name: a, method: awq, awq_mappings: auto}", "awq_mappings"),
    ("preset", "  - {name: a, method: gptq, preset: fast}", "variants[0].preset"),
]


@pytest.mark.parametrize("description, variants, expected", METHOD_MISTAKES, ids=[m[0] for m in METHOD_MISTAKES])
def test_method_options_are_checked_before_any_model_loads(description, variants, expected):
    with pytest.raises(ValueError) as caught:
        parse_recipe(f"name: t\nmodel: builtin:tiny-phi4-mini\nvariants:\n{variants}\n", "r.yaml")
    assert expected in str(caught.value)


def test_method_defaults():
    recipe = parse_recipe(
        "name: t\nmodel: m\nvariants:\n  - {name: g, method: gptq}\n  - {name: o, method: onnx-int8}\n"
        "  - {name: c, method: onnx-int4, from: g}\n"
    )
    gptq, int8, carried = recipe.variants
    assert gptq.formats == ["compressed-tensors"] and int8.formats == ["onnx"] and int8.bits == 8
    assert carried.from_ == "g" and recipe.model_dump(by_alias=True)["variants"][2]["from"] == "g"


def test_matrix_expands_with_predictable_names_and_each_is_validated():
    recipe = parse_recipe(
        "name: s\nmodel: m\nvariants:\n"
        "  - {name: sweep, method: rtn, matrix: {group_size: [32, 128], bits: [3, 4], method: [rtn, gptq]}}\n"
        "  - {name: carried, method: onnx-int4, from: sweep-gptq-w4-g128}\n"
    )
    names = [v.name for v in recipe.variants]
    assert names[:4] == ["sweep-rtn-w3-g32", "sweep-rtn-w3-g128", "sweep-rtn-w4-g32", "sweep-rtn-w4-g128"]
    assert len(names) == 9 and recipe.variants[7].method == "gptq" and recipe.variants[7].bits == 4
    with pytest.raises(ValueError, match="variants\\[0\\].bits: must be one of 2, 3, 4, 5, 6, 8"):
        parse_recipe("name: s\nmodel: m\nvariants:\n  - {name: x, method: rtn, matrix: {bits: [7]}}\n")
    with pytest.raises(ValueError, match="variants\\[0\\].matrix: must map option names to non-empty lists"):
        parse_recipe("name: s\nmodel: m\nvariants:\n  - {name: x, method: rtn, matrix: {bits: 4}}\n")
