"""The quantization plan: what `quantize` decided, before (and independently of) any graph edit.

A plan maps tensors to how they are stored or rounded (`TensorQuant`: dtype, scale, zero point,
axis, block size, and for activations the calibrated range and method) and records one
`NodeDecision` per layer the pass looked at (quantized, kept in float, or skipped, with the reason
and, when measured, its sensitivity). The apply step reads nothing but the plan.

Serialization (`QuantPlan.to_dict`) is JSON-ready. ``compact=True`` (what reports store) writes
small arrays in full and summarizes larger ones (``{"n", "shape", "min", "max"}``), so a plan stays
per tensor, never per element; ``compact=False`` writes every scale and zero point and
`QuantPlan.from_dict` reads it back exactly (float32 scales survive the round trip through
Python floats). Integer codes of weights are held in memory for the apply step and never
serialized.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from graph_opt.kernels.quant import DTYPE_RANGES, QuantParams

# Arrays up to this many elements are written in full even in compact form.
COMPACT_MAX = 8

Role = Literal["weight", "bias", "activation"]
Action = Literal["quantize", "float", "skip"]


@dataclass(eq=False)
class TensorQuant:
    """How one tensor is quantized (names are those of the model the plan was made for).

    ``scheme``: 'affine' (scale/zero point from the data range), 'ternary'/'binary' (α per channel,
    int2 codes), 'bias' (int32, scale = s_x·s_w, zero point 0) or 'shared' (an activation that
    reuses the parameters of ``shared_with`` because the op between them only moves values).
    """

    tensor: str
    role: Role
    dtype: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None
    block_size: int | None = None
    scheme: str = "affine"
    method: str | None = None
    range: tuple[float, float] | None = None
    shared_with: str | None = None
    shape: tuple[int, ...] | None = None
    # Activations: None = every reader reads the quantized value (its producer is quantized),
    # else the labels of the only nodes that do (the others keep reading the float tensor).
    consumers: list[str] | None = None
    codes: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.scale = np.asarray(self.scale, dtype=np.float32)
        zp_dtype = np.int32 if self.dtype == "int32" else np.dtype(
            np.int8 if DTYPE_RANGES[self.dtype][0] < 0 else np.uint8)
        self.zero_point = np.asarray(self.zero_point).astype(zp_dtype)
        if self.zero_point.shape != self.scale.shape:
            raise ValueError(f"{self.tensor}: zero point shape {self.zero_point.shape} != "
                             f"scale shape {self.scale.shape}")

    @classmethod
    def from_params(cls, tensor: str, role: Role, params: QuantParams, **kw: Any) -> TensorQuant:
        return cls(tensor, role, params.dtype, np.array(params.scale), np.array(params.zero_point),
                   params.axis, params.block_size, **kw)

    def params(self) -> QuantParams:
        """The kernel's QuantParams (not for int32 biases)."""
        return QuantParams(scale=self.scale, zero_point=self.zero_point, dtype=self.dtype,
                           axis=self.axis, block_size=self.block_size)

    @property
    def granularity(self) -> str:
        if self.axis is None:
            return "tensor"
        return "channel" if self.block_size is None else "block"

    def to_dict(self, compact: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"tensor": self.tensor, "role": self.role, "dtype": self.dtype, "scheme": self.scheme,
                               "granularity": self.granularity}
        if self.axis is not None:
            out["axis"] = self.axis
        if self.block_size is not None:
            out["block_size"] = self.block_size
        if self.shape is not None:
            out["shape"] = list(self.shape)
        out["scale"] = _array_out(self.scale, compact)
        out["zero_point"] = _array_out(self.zero_point, compact)
        if self.method is not None:
            out["method"] = self.method
        if self.range is not None:
            out["range"] = [float(self.range[0]), float(self.range[1])]
        if self.shared_with is not None:
            out["shared_with"] = self.shared_with
        if self.role == "activation":
            out["consumers"] = "all" if self.consumers is None else list(self.consumers)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorQuant:
        return cls(
            tensor=d["tensor"], role=d["role"], dtype=d["dtype"],
            scale=_array_in(d["scale"], np.float32, d["tensor"]),
            zero_point=_array_in(d["zero_point"], np.int64, d["tensor"]),
            axis=d.get("axis"), block_size=d.get("block_size"), scheme=d.get("scheme", "affine"),
            method=d.get("method"), range=tuple(d["range"]) if d.get("range") is not None else None,
            shared_with=d.get("shared_with"), shape=tuple(d["shape"]) if d.get("shape") is not None else None,
            consumers=None if d.get("consumers", "all") == "all" else list(d["consumers"]))


@dataclass
class NodeDecision:
    """What the pass decided for one node: quantize it, keep it in float, or skip it (why)."""

    node: str
    op: str
    action: Action
    reason: str = ""
    inputs: list[str] = field(default_factory=list)   # activation tensors quantized for this node
    weight: str | None = None
    bias: str | None = None
    output: str | None = None                          # the quantized tensor this node's chain writes
    absorbed: str | None = None                        # Relu/Clip folded into the output range
    sensitivity: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.node, "op": self.op, "action": self.action}
        for key in ("reason", "inputs", "weight", "bias", "output", "absorbed"):
            value = getattr(self, key)
            if value:
                out[key] = value
        if self.sensitivity:
            # JSON has no infinity: a noiseless measurement reads "inf".
            out["sensitivity"] = {k: v if np.isfinite(v) else str(v) for k, v in self.sensitivity.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeDecision:
        return cls(node=d["node"], op=d["op"], action=d["action"], reason=d.get("reason", ""),
                   inputs=list(d.get("inputs", [])), weight=d.get("weight"), bias=d.get("bias"),
                   output=d.get("output"), absorbed=d.get("absorbed"),
                   sensitivity={k: float(v) for k, v in d["sensitivity"].items()} if d.get("sensitivity") else None)


@dataclass
class QuantPlan:
    """Tensor → quantization, node → decision, and the opset the result needs."""

    opset: int
    tensors: dict[str, TensorQuant] = field(default_factory=dict)
    nodes: list[NodeDecision] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, tq: TensorQuant) -> TensorQuant:
        self.tensors[tq.tensor] = tq
        return tq

    def by_role(self, role: Role) -> list[TensorQuant]:
        return [t for t in self.tensors.values() if t.role == role]

    def decisions(self, action: Action) -> list[NodeDecision]:
        return [d for d in self.nodes if d.action == action]

    def decision(self, node: str) -> NodeDecision | None:
        for d in self.nodes:
            if d.node == node:
                return d
        return None

    @property
    def empty(self) -> bool:
        return not self.tensors

    def to_dict(self, compact: bool = True) -> dict[str, Any]:
        return {
            "opset": self.opset,
            "tensors": [t.to_dict(compact) for t in self.tensors.values()],
            "nodes": [d.to_dict() for d in self.nodes],
            "notes": list(self.notes),
        }

    def to_json(self, compact: bool = True) -> str:
        return json.dumps(self.to_dict(compact), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantPlan:
        tensors = [TensorQuant.from_dict(t) for t in d.get("tensors", [])]
        return cls(opset=int(d["opset"]), tensors={t.tensor: t for t in tensors},
                   nodes=[NodeDecision.from_dict(n) for n in d.get("nodes", [])], notes=list(d.get("notes", [])))


def _array_out(a: np.ndarray, compact: bool) -> Any:
    if a.ndim == 0:
        return a.item()
    if compact and a.size > COMPACT_MAX:
        return {"n": int(a.size), "shape": list(a.shape), "min": a.min().item(), "max": a.max().item()}
    return {"shape": list(a.shape), "values": a.ravel().tolist()}


def _array_in(v: Any, dtype: type, where: str) -> np.ndarray:
    if isinstance(v, dict):
        if "values" not in v:
            raise ValueError(f"{where}: a compact (summarized) plan cannot be read back; save it with compact=False")
        return np.asarray(v["values"], dtype=dtype).reshape(v["shape"])
    return np.asarray(v, dtype=dtype)
