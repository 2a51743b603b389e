"""ModelConfig refuses wrong types and values with the field's name, before anything is built."""

import pytest

from xinzhou.config import preset


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size="64"), r"hidden_size = '64': expected an integer"),
    (dict(vocab_size=None), r"vocab_size = None: expected an integer"),
    (dict(num_experts=4.0), r"num_experts = 4\.0: expected an integer"),
    (dict(tie_embeddings=1), r"tie_embeddings = 1: expected True or False"),
    (dict(rope_theta="1e4"), r"rope_theta = '1e4': expected a number"),
    (dict(eos_token_id="2"), r"eos_token_id = '2': expected an integer or None"),
    (dict(layer_types="LS"), r"layer_types = 'LS': expected a sequence"),
    (dict(layer_types=("lightning", "sliding")), r"layer_types\[1\] = 'sliding'"),
    (dict(head_dim=0), r"head_dim = 0: must be > 0"),
    (dict(num_kv_heads=3), r"num_heads = 4 is not a multiple of num_kv_heads = 3"),
])
def test_bad_fields_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **change)


def test_good_config_keeps_its_values():
    cfg = preset("tiny", vocab_size=300, eos_token_id=2, layer_types=["lightning", "softmax"])
    assert cfg.layer_types == ("lightning", "softmax") and cfg.vocab_size == 300 and cfg.eos_token_id == 2
