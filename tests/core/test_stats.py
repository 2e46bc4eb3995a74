from builders import GraphBuilder, small_cnn

from graph_opt.stats import count_params, layer_macs, model_stats, op_histogram


def test_macs_and_params_by_hand():
    g = GraphBuilder()
    x = g.input("x", ["N", 3, 10, 10])
    c = g.conv(x, 3, 8, 3, name="c", pads=[0, 0, 0, 0])                   # out 8x8x8, 3*3*3 per output
    d = g.conv(c, 8, 8, 3, group=8, name="dw", pads=[1, 1, 1, 1], strides=[2, 2])  # out 8x4x4, 9 per output
    f = g.node("Flatten", [d], axis=1)
    y = g.gemm(f, 128, 10, name="fc")
    m = g.node("MatMul", [y, g.weight("mm.w", (10, 4))], name="mm")
    g.output(m, ["N", 4])
    model = g.build()
    macs = {l.name: l.macs for l in layer_macs(model)}
    assert macs == {"c": 8 * 8 * 8 * 27, "dw": 8 * 4 * 4 * 9, "fc": 10 * 128, "mm": 4 * 10}
    assert count_params(model) == (8 * 27 + 8) + (8 * 9 + 8) + (128 * 10 + 10) + 40
    assert layer_macs(model, {"x": (4, 3, 10, 10)})[0].macs == 4 * macs["c"]


def test_model_stats_summary():
    model = small_cnn()
    stats = model_stats(model)
    assert stats.ops["Conv"] == 4 and stats.ops["BatchNormalization"] == 4
    assert stats.macs == sum(l.macs for l in stats.layers) and stats.macs > 0
    assert stats.file_bytes == model.ByteSize() and stats.weight_bytes <= stats.file_bytes
    assert op_histogram(model) == stats.ops
