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


def test_onnx_matmulnbits_and_matmulinteger_count_every_stored_byte():
    from compress.verify.size import onnx_bits_per_weight

    K, N, block = 128, 64, 32
    initializers = {
        "w_Q4": (N * K // 2, N * K // 2),  # uint8 packed, two 4-bit values a byte
        "w_scales": (N * K // block, N * K // block * 2),  # fp16
        "v_quantized": (K * N, K * N),  # int8
        "v_scale": (N, N * 4),
        "v_zero_point": (N, N),
        "norm": (K, K * 4),
    }
    nodes = [("MatMulNBits", ["x", "w_Q4", "w_scales"], {"K": K, "N": N, "bits": 4, "block_size": block}),
             ("MatMulInteger", ["xq", "v_quantized", "x_zp", "v_zero_point"], {})]
    figures = onnx_bits_per_weight(initializers, nodes)
    quantized_bytes = N * K // 2 + N * K // block * 2 + K * N + N * 4 + N
    assert figures["quantized_weights"] == 2 * K * N
    assert figures["bits_per_weight"] == 8 * quantized_bytes / (2 * K * N)
    assert figures["bits_per_weight_all"] == 8 * (quantized_bytes + K * 4) / (2 * K * N + K)


def test_sqnr_hand_cases():
    import math

    from compress.verify.layers import sqnr_db

    assert sqnr_db(100.0, 1.0) == 20.0
    assert sqnr_db(1.0, 0.0) == math.inf
