import numpy as np

from compress.verify.size import bits_per_weight


def test_group_32_int4_with_fp16_scales_is_4_5_bits_and_whole_model_counts_everything():
    out_features, in_features, group = 64, 128, 32
    tensors = {
        # 4-bit weights packed 8 per int32: [out, in / 8]
        "layer.weight_packed": np.zeros((out_features, in_features // 8), dtype=np.int32),
        "layer.weight_scale": np.zeros((out_features, in_features // group), dtype=np.float16),
        "layer.weight_shape": np.array([out_features, in_features], dtype=np.int64),
        "norm.weight": np.zeros(in_features, dtype=np.float32),
    }
    figures = bits_per_weight(tensors)
    assert figures["bits_per_weight"] == 4 + 16 / group
    quantized_bytes = out_features * in_features / 2 + out_features * in_features / group * 2
    expected_all = 8 * (quantized_bytes + in_features * 4) / (out_features * in_features + in_features)
    assert figures["bits_per_weight_all"] == expected_all
    assert figures["quantized_weights"] == out_features * in_features


def test_unquantized_checkpoint_has_no_quantized_bits_and_32_bits_overall():
    figures = bits_per_weight({"w": np.zeros((4, 4), dtype=np.float32)})
    assert np.isnan(figures["bits_per_weight"])
    assert figures["bits_per_weight_all"] == 32
