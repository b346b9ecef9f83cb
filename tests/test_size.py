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


def test_quantized_layer_bits_count_float_linears_and_a_tied_head_at_their_stored_width():
    hidden, vocab = 64, 256
    layer = {"model.layers.0.mlp.down_proj.weight_packed": np.zeros((hidden, hidden // 8), dtype=np.int32),
             "model.layers.0.mlp.down_proj.weight_scale": np.zeros((hidden, 1), dtype=np.float16),
             "model.layers.0.mlp.down_proj.weight_shape": np.array([hidden, hidden]),
             "model.layers.0.self_attn.o_proj.weight": np.zeros((hidden, hidden), dtype=np.float16),
             "model.layers.0.input_layernorm.weight": np.zeros(hidden, dtype=np.float16),
             "model.norm.weight": np.zeros(hidden, dtype=np.float16),
             "model.embed_tokens.weight": np.zeros((vocab, hidden), dtype=np.float16)}
    down = hidden * hidden // 2 + hidden * 2  # 4-bit codes, one fp16 scale per row
    tied = bits_per_weight(layer)  # no lm_head tensor: the tied head is the embedding table, 16 bits
    assert tied["quantized_layer_bits"] == 8 * (down + hidden * hidden * 2 + vocab * hidden * 2) / (2 * hidden * hidden + vocab * hidden)
    head = {"lm_head.weight_packed": np.zeros((vocab, hidden // 4), dtype=np.int32),  # 8-bit head, untied
            "lm_head.weight_scale": np.zeros((vocab, 1), dtype=np.float16), "lm_head.weight_shape": np.array([vocab, hidden])}
    untied = bits_per_weight({**layer, **head})  # the float embedding is no layer a plan changes here
    assert untied["quantized_layer_bits"] == 8 * (down + hidden * hidden * 2 + vocab * (hidden + 2)) / (2 * hidden * hidden + vocab * hidden)


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
        "head": (K * N, K * N * 4),  # a layer kept float32
    }
    nodes = [("MatMulNBits", ["x", "w_Q4", "w_scales"], {"K": K, "N": N, "bits": 4, "block_size": block}),
             ("MatMulInteger", ["xq", "v_quantized", "x_zp", "v_zero_point"], {}),
             ("SimplifiedLayerNormalization", ["h", "norm"], {}), ("MatMul", ["h", "head"], {})]
    figures = onnx_bits_per_weight(initializers, nodes)
    quantized_bytes = N * K // 2 + N * K // block * 2 + K * N + N * 4 + N
    assert figures["quantized_weights"] == 2 * K * N
    assert figures["bits_per_weight"] == 8 * quantized_bytes / (2 * K * N)
    assert figures["bits_per_weight_all"] == 8 * (quantized_bytes + K * 4 + K * N * 4) / (3 * K * N + K)
    assert figures["quantized_layer_bits"] == 8 * (quantized_bytes + K * N * 4) / (3 * K * N)  # the norm is no layer


def test_sqnr_hand_cases():
    import math

    from compress.verify.layers import sqnr_db

    assert sqnr_db(100.0, 1.0) == 20.0
    assert sqnr_db(1.0, 0.0) == math.inf
