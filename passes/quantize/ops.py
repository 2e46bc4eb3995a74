"""The op tables of the quantize pass: which ops share their input's scale, which take their
own, which an output QDQ absorbs, and which are already quantized (the layers themselves are
`passes._graph.LAYER_OPS`)."""

from __future__ import annotations

# Ops that only move or select values: the outputs share the input's scale (ORT drops the QDQ).
# Resize only in its default nearest mode (the others interpolate).
SHARED_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Split", "Slice", "Gather",
              "Resize", "DepthToSpace")
# Ops with an integer kernel in onnxruntime taking per-input scales and an output scale.
OWN_OPS = ("Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool")
# Activations a layer's output QDQ absorbs (its range clamps as they do).
ABSORBED_OPS = ("Relu", "Clip")
# Ops of already quantized graphs: never quantized twice.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "MatMulNBits", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "QAttention", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearWhere",
    "QLinearReduceMean", "QLinearConvTranspose", "QEmbedLayerNormalization", "DequantizeBFP", "QuantizeBFP",
})
