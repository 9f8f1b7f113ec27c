"""RQTransformerConfig: class names, condition dropout of the presets, the null-condition error."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from rqvae.errors import UserError
from rqvae.models.transformer import AR_PRESETS, RQTransformer, RQTransformerConfig
from tests.helpers.ar_fixtures import TINY, make

NAMES = tuple(f"class-{i}" for i in range(TINY.num_classes))


def test_class_names_are_saved_and_loaded(tmp_path):
    model = make("class", class_names=list(NAMES))  # a list (as JSON gives it) becomes a tuple
    assert model.config.class_names == NAMES
    model.save_pretrained(tmp_path / "ar")
    assert json.loads((tmp_path / "ar" / "config.json").read_text())["class_names"] == list(NAMES)
    assert RQTransformer.from_pretrained(tmp_path / "ar").config.class_names == NAMES


def test_config_json_without_class_names_still_loads(tmp_path):
    make("class").save_pretrained(tmp_path / "ar")
    path = tmp_path / "ar" / "config.json"
    saved = json.loads(path.read_text())
    del saved["class_names"]  # as written before the field existed
    path.write_text(json.dumps(saved))
    assert RQTransformer.from_pretrained(tmp_path / "ar").config.class_names == ()


@pytest.mark.parametrize("kw,message", [
    (dict(class_names=NAMES[:-1]), "9 class names for 10 classes"),
    (dict(class_names=NAMES + ("extra",)), "11 class names for 10 classes"),
    (dict(cond_type="uncond", class_names=NAMES), "class_names are for class-conditional models"),
])
def test_class_names_must_match_the_classes(kw, message):
    with pytest.raises(UserError, match=message):
        replace(TINY, **kw)


def test_small_class_presets_have_a_null_condition_except_tiny():
    assert AR_PRESETS["fmnist-small"].cfg_dropout == 0.1
    # tiny stays without one: tests derive unconditional models from it and check the null-condition error
    assert AR_PRESETS["tiny"].cfg_dropout == 0.0


def test_null_condition_error_names_the_fix():
    with pytest.raises(UserError) as err:
        _ = RQTransformerConfig(cond_type="class").null_id
    assert "--cfg-scale 1" in str(err.value) and "--cond-dropout 0.1 (train-ar)" in str(err.value)


def test_config_json_without_depth_block_fields_loads_with_the_spatial_options(tmp_path):
    make("class", attn_bias=False, gelu="sigmoid").save_pretrained(tmp_path / "ar")
    path = tmp_path / "ar" / "config.json"
    saved = json.loads(path.read_text())
    for k in ("depth_attn_bias", "depth_mlp_bias", "depth_gelu"):  # as written before the fields existed
        del saved[k]
    path.write_text(json.dumps(saved))
    model = RQTransformer.from_pretrained(tmp_path / "ar")
    depth_block = model.depth_blocks[0]
    assert depth_block.attn.query.bias is None and depth_block.mlp[0].bias is not None
    assert depth_block.mlp[1].kind == "sigmoid"


def test_depth_stack_has_its_own_biases_and_gelu():
    model = make("class", depth_attn_bias=True, depth_mlp_bias=False, depth_gelu="sigmoid", attn_bias=False)
    spatial, depth = model.spatial_blocks[0], model.depth_blocks[0]
    assert spatial.attn.query.bias is None and depth.attn.query.bias is not None
    assert spatial.mlp[0].bias is not None and depth.mlp[0].bias is None
    assert (spatial.mlp[1].kind, depth.mlp[1].kind) == ("exact", "sigmoid")
    with pytest.raises(UserError, match="depth_gelu"):
        replace(TINY, depth_gelu="tanh")
