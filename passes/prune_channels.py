"""prune_channels: choose whole output channels by importance, then zero them or remove them.

Before/after (mode=remove, channel c of conv1 chosen)::

    x → Conv1(W1[16,…], b1) → BN → Relu → Conv2(W2[32,16,…], b2) → y
    x → Conv1(W1[15,…], b1') → BN' → Relu → Conv2(W2[32,15,…], b2 + Σ_taps W2[:, c]·k_c) → y

**Groups** (`passes/_groups.py`): channels that must go together, followed from a layer's output
through BN, elementwise ops and pooling into the next layers; residual Add/Mul/Sub, Concat,
Split/Slice, depthwise convs, SE gates, Flatten/Reshape → Gemm and transformer FFNs are followed.

**Importance** per channel, summed over a group's producers: `l1` Σ|w|, `l2` √Σw² (of the
effective filter W·γ/√(σ²+ε) when a BatchNormalization follows, so the score is the same before
and after `fold_batchnorm`), `bn_gamma` |γ|, `activation` mean |a| or 1 − APoZ of what the
consumers read on the calibration data, counting only the positions a 0/1 mask input keeps
(``row_mask=``, default ``auto``: the real tokens of padded sentences, see `graph_opt.row_mask`;
a note names it). `scope=layer` prunes ⌊ratio·n⌋ channels of every group;
`scope=global` ranks all groups together (scores over their group's mean). Every group keeps at
least `min_channels`, rounded up to a multiple of `round_to` (default 4: widths that are not
multiples of 4 can run slower than the original on onnxruntime's CPU kernels, see
benchmarks/bench_prune.py), so `ratio` is an upper bound.

**mode=zero** zeroes the producers' filters; the channel then emits a constant k_c (its bias
pushed through BN, activations, residual sums). **mode=remove** deletes the channels everywhere
(weights, biases, BN parameters, per-channel constants, depthwise `group`, consumer inputs;
Reshape targets, Split sizes and Slice bounds recomputed) and folds k_c into the consumers' biases:
Conv ``b'[o] = b[o] + Σ_c k_c Σ_taps W[o, c, taps]``; Gemm ``C' = C + (α/β) Σ_c k_c op(B)[c, :]``;
MatMul ``bias' = bias + Σ_c k_c W[c, :]`` (an Add is created when there is no bias).

Error bound: remove equals zero (to float rounding) whenever the fold is exact: every consumer is
a Gemm/MatMul or an unpadded Conv, or k_c = 0. A padded Conv sees 0, not k_c, on its zero-padded
border. `fold=exact` (default) only chooses channels whose fold is exact; `fold=approximate` also
takes the others and reports per consumer the border error bound ``max_o Σ_c |k_c| Σ_taps |W[o, c]|``.
Dropping live filters is lossy with no stated bound: the pipeline's verification measures it.

Layers: a group's producers must all match `op_types`, `include` (fnmatch on node names) and not
`exclude`; with `keep_first_last` a group touching the first or last layer is left alone.

Skipped groups, with the reason: channels reaching a graph output; an op the analysis does not
understand; a grouped (non-depthwise) conv; a MatMul of two runtime tensors or with the channels
on its right; a Reshape splitting the channel axis or computed at run time; a weight, bias or
per-channel constant shared with another node; channels read inside a subgraph (If/Loop/Scan
bodies are not rewritten); a producer not selected; no more than `min_channels` channels; no
BatchNormalization (bn_gamma); channels not observed in calibration (activation); no channel
whose fold is exact (fold=exact); a ratio that rounds to 0. importance=activation without
calibration data skips the pass. A layer input, Split/Slice piece or reshaped axis is never
emptied (its strongest channel is kept, `kept_so_no_piece_empties`).

Report: per group (channels, pruned, kept, the pruned indices, why fewer than asked), per changed
node (parameters and MACs before/after) and the model totals; with fold=approximate, a note per
consumer with its border error bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graph_opt.budget import Budgeted, run_budget
from graph_opt.data import input_specs
from graph_opt.intermediates import stream
from graph_opt.kernels.importance import ActivationStats, bn_gamma_scores, channel_norms, channel_sumsq, select_channels
from graph_opt.gs_convert import to_graph, to_model
from graph_opt.model_io import copy_model
from graph_opt.pass_base import PassContext, PassReport
from graph_opt.onnx_util import Namer
from graph_opt.row_mask import AUTO, RowMask, resolve as resolve_row_mask
from graph_opt.passes._graph import (LAYER_OPS, check_op_types, constant, infer_shapes, is_graph_output, node_label,
                                     report_subgraphs,
                                     used_once)
from graph_opt.passes._groups import (Analysis, Group, Slice, analyze, boundary_layers,
                                      fold_problems, selected)
from graph_opt.stats import count_params, layer_macs

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PruneChannels(Budgeted):
    """Prune whole channels (zero or remove), tied groups found on the graph; exact fold of dead channels."""

    name: ClassVar[str] = "prune_channels"
    default_levels: ClassVar[tuple[float, ...]] = (0.25, 0.5, 0.75)
    level_name: ClassVar[str] = "ratio"

    ratio: float = 0.3
    scope: Literal["layer", "global"] = "layer"
    mode: Literal["zero", "remove"] = "remove"
    importance: Literal["l1", "l2", "bn_gamma", "activation"] = "l1"
    activation_stat: Literal["mean_abs", "apoz"] = "mean_abs"
    fold: Literal["exact", "approximate"] = "exact"
    op_types: tuple[str, ...] = LAYER_OPS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_first_last: bool = True
    min_channels: int = 1
    round_to: int = 4
    row_mask: str | None = AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        check_op_types(self)
        if self.budgeted and self.scope == "global":
            raise ValueError("target_macs/target_params/min_snr_db choose a ratio per group: scope=global does not apply")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must lie in [0, 1), got {self.ratio}")
        if self.min_channels < 1:
            raise ValueError(f"min_channels must be >= 1, got {self.min_channels}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")

    # budgets (graph_opt/budget.py): the unit is a group of tied channels, its level the ratio
    def budget_levels(self) -> tuple[float, ...]:
        return tuple(sorted(self.levels or self.default_levels))

    def at_level(self, level: float, include: tuple[str, ...]) -> PruneChannels:
        return self.cleared(ratio=level, include=include or self.include)

    def budget_units(self, report: PassReport) -> list[tuple[str, tuple[str, ...]]]:
        return [(e["node"], tuple(e["producers"])) for e in report.rewritten if "producers" in e]

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        if self.budgeted:
            return run_budget(self, model, report, ctx)
        if self.importance == "activation" and ctx.data is None:
            report.skip("model", "importance=activation needs calibration data (ctx.data is None); nothing pruned")
            return model
        if self.ratio == 0.0:
            return model
        work = copy_model(model)
        del work.graph.value_info[:]  # channel counts change: stale shapes would fail the checker
        graph = to_graph(work)
        report_subgraphs(graph, report, self.op_types)
        graph.toposort()
        an = analyze(graph, infer_shapes(model))
        plan = self._plan(graph, an, report, ctx, model)
        if not plan:
            return model
        namer = Namer(graph)
        for node in graph.nodes:  # stable names: the per-layer report matches layers by name
            if not node.name:
                node.name = namer(f"{node.op}_{node.outputs[0].name if node.outputs else ''}")
        before = to_model(graph, model)
        dead = set().union(*(d for _, d, _ in plan))
        if self.mode == "zero":
            touched = _apply_zero(an, dead, namer)
            if not touched:  # the chosen filters are zero already: nothing changes
                report.note("the chosen channels are already zero")
                return model
        else:
            touched = _Remover(graph, an, dead, namer, report).apply()
        graph.cleanup().toposort()
        out = to_model(graph, model)
        for group, classes, details in plan:
            report.rewrite(group.label, **details)
        odd = sorted({d["kept"] for _, _, d in plan if d["kept"] % 4})
        if self.mode == "remove" and odd:
            report.note(f"kept widths {', '.join(map(str, odd))} are not multiples of 4: onnxruntime's CPU kernels can "
                        "run such layers slower than the original wider ones despite fewer MACs; round_to=4 avoids it")
        _report_layers(report, model, before, out, touched, "zeroed filters" if self.mode == "zero" else "resized")
        return out

    # ------------------------------------------------------------------ decide
    def _plan(self, graph: gs.Graph, an: Analysis, report: PassReport, ctx: PassContext,
              model: onnx.ModelProto) -> list[tuple[Group, set[int], dict]]:
        first, last = boundary_layers(graph) if self.keep_first_last else (set(), set())
        touched: dict[int, dict[int, gs.Node]] = {}
        for s in an.slices:
            for root in an.groups_touching(s.atoms):
                touched.setdefault(root, {})[id(s.node)] = s.node
        candidates: list[Group] = []
        for g in an.groups:
            if g.reasons:
                more = f" (+{len(g.reasons) - 3} more)" if len(g.reasons) > 3 else ""
                report.skip(g.label, "; ".join(g.reasons[:3]) + more)
                continue
            unselected = [p.node for p in g.producers if not selected(p.node, self.op_types, self.include, self.exclude)]
            if unselected:
                report.skip(g.label, f"{node_label(unselected[0])} ({unselected[0].op}) is not selected "
                                     "by op_types/include/exclude")
                continue
            edge = [n for i, n in touched.get(g.root, {}).items() if i in first or i in last]
            if edge:
                which = "first" if id(edge[0]) in first else "last"
                report.skip(g.label, f"touches the {which} layer {node_label(edge[0])} (keep_first_last)")
                continue
            if len(g.classes) <= self.min_channels:
                report.skip(g.label, f"only {len(g.classes)} channel(s), min_channels={self.min_channels}")
                continue
            candidates.append(g)
        if not candidates:
            return []
        scores = self._scores(candidates, an, report, ctx, model)
        kept = [(g, s) for g, s in zip(candidates, scores) if s is not None]
        if not kept:
            return []
        problems = fold_problems(an, exact=self.fold == "exact")
        groups, scores = [g for g, _ in kept], [s for _, s in kept]
        eligible = [np.array([int(c) not in problems for c in g.classes]) for g in groups]
        masks, protected, stuck = self._select(an, groups, scores, eligible)
        plan = []
        for g, ok, mask in zip(groups, eligible, masks):
            n = len(g.classes)
            if g.root in stuck:
                report.skip(g.label, f"removing its channels would empty {stuck[g.root]}")
                continue
            if not mask.any():
                if not ok.any():
                    why = problems[int(g.classes[0])]
                    report.skip(g.label, f"no channel can be removed with an exact fold: e.g. {why}")
                elif self.scope == "layer" and int(np.floor(self.ratio * n + 1e-9)) == 0:
                    report.skip(g.label, f"ratio {self.ratio} of {n} channels rounds to 0")
                else:
                    report.skip(g.label, "no channel ranked low enough (scope=global)")
                continue
            p0 = g.producers[0]
            dead_classes = set(g.classes[mask].tolist())
            pruned = np.flatnonzero(np.isin(an.class_root[p0.atoms], list(dead_classes))).tolist()
            details = {
                "action": "removed channels" if self.mode == "remove" else "zeroed channels",
                "channels": n, "pruned": int(mask.sum()), "kept": n - int(mask.sum()),
                "importance": self.importance, "producers": [node_label(p.node) for p in g.producers],
                "pruned_channels": pruned,
            }
            asked = int(np.floor(self.ratio * n + 1e-9)) if self.scope == "layer" else None
            if not ok.all():
                details["not_exactly_removable"] = int((~ok).sum())
                first_bad = next(int(c) for c, e in zip(g.classes, ok) if not e)
                if asked is not None and mask.sum() < asked:
                    details["short_because"] = problems[first_bad]
            kept_whole = int(np.isin(g.classes, list(protected)).sum())
            if kept_whole:
                details["kept_so_no_piece_empties"] = kept_whole
            plan.append((g, dead_classes, details))
        return plan

    def _select(self, an: Analysis, groups: list[Group], scores: list[np.ndarray], eligible: list[np.ndarray]):
        """Masks of channels to prune; never empties a layer input, a Split/Slice piece or a reshaped axis.

        When a choice would, the strongest channel of that piece is kept and the choice is redone.
        Returns (masks, protected classes, {group root: what it would empty} for groups given up).
        """
        where = {int(c): (gi, ci) for gi, g in enumerate(groups) for ci, c in enumerate(g.classes.tolist())}
        pieces = _pieces(an)
        protected: set[int] = set()
        while True:
            allowed = [ok & ~np.isin(g.classes, list(protected)) for g, ok in zip(groups, eligible)]
            masks = select_channels(scores, self.ratio, scope=self.scope, eligible=allowed, min_keep=self.min_channels,
                                    round_to=self.round_to)
            dead = set().union(*(g.classes[m].tolist() for g, m in zip(groups, masks)))
            emptied = [(atoms, what) for atoms, what in pieces if atoms.size and an.dead_mask(atoms, dead).all()]
            if not emptied:
                return masks, protected, {}
            grew = False
            for atoms, _ in emptied:
                inside = [c for c in set(an.class_root[atoms].tolist()) if c in where]
                best = max(inside, key=lambda c: scores[where[c][0]][where[c][1]])
                if best not in protected:
                    protected.add(best)
                    grew = True
            if not grew:  # cannot happen while every emptied piece holds a candidate; stay safe anyway
                stuck = {}
                for atoms, what in emptied:
                    for root in an.groups_touching(atoms):
                        stuck.setdefault(root, what)
                return masks, protected, stuck

    def _scores(self, groups: list[Group], an: Analysis, report: PassReport, ctx: PassContext,
                model: onnx.ModelProto) -> list[np.ndarray | None]:
        index = {int(c): (gi, ci) for gi, g in enumerate(groups) for ci, c in enumerate(g.classes.tolist())}
        totals = [np.zeros(len(g.classes)) for g in groups]
        counts = [np.zeros(len(g.classes)) for g in groups]

        def add(atoms: np.ndarray, values: np.ndarray) -> None:
            for c, v in zip(an.class_root[atoms].tolist(), values.tolist()):
                hit = index.get(c)
                if hit is not None:
                    totals[hit[0]][hit[1]] += v
                    counts[hit[0]][hit[1]] += 1

        if self.importance in ("l1", "l2"):
            for p in an.producers:
                w = constant(p.node.inputs[1])
                scale = _bn_scale(p.node, len(p.atoms))
                if self.importance == "l1":
                    add(p.atoms, channel_norms(w, p.weight_axis, 1) * scale)
                else:
                    add(p.atoms, channel_sumsq(w, p.weight_axis) * scale ** 2)
            return [np.sqrt(t) if self.importance == "l2" else t for t in totals]
        if self.importance == "bn_gamma":
            for bn, chan in an.bns:
                add(chan.atoms, bn_gamma_scores(constant(bn.inputs[1])))
            out: list[np.ndarray | None] = []
            for g, t, c in zip(groups, totals, counts):
                if not c.any():
                    report.skip(g.label, "no BatchNormalization on its channels "
                                         "(importance=bn_gamma; run it before fold_batchnorm)")
                    out.append(None)
                else:
                    out.append(t)
            return out
        # activation: what the consumers read, one streaming pass over the calibration data
        wanted = {}
        roots = {g.root for g in groups}
        for site in an.folds:
            if an.groups_touching(site.chan.atoms) & roots:
                wanted.setdefault(site.node.inputs[0].name, site.chan)
        mask, why = resolve_row_mask(self.row_mask, model, ctx.data)
        for note in (why, mask and mask.describe()):
            if note:
                report.note(note)
        stats = _activation_stats(model, wanted, ctx, mask)
        for name, chan in wanted.items():
            add(chan.atoms, stats[name].importance(self.activation_stat))
        out = []
        for g, t, c in zip(groups, totals, counts):
            if not c.all():
                report.skip(g.label, "its channels were not observed on the calibration data")
                out.append(None)
            else:
                out.append(t / c)
        return out


def _bn_scale(node: gs.Node, n: int) -> np.ndarray:
    """|γ|/√(σ² + ε) of a BatchNormalization reading the layer's output alone, else ones.

    The filter norm then measures the effective filter W·γ/√(σ² + ε): BN rescales every channel,
    so the norm of W alone says nothing about how strong the channel is.
    """
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "BatchNormalization":
        return np.ones(n)
    bn = out.outputs[0]
    gamma, var = constant(bn.inputs[1]), constant(bn.inputs[4])
    if gamma is None or var is None or gamma.size != n or var.size != n:
        return np.ones(n)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    return np.abs(gamma.astype(np.float64).ravel()) / np.sqrt(var.astype(np.float64).ravel() + eps)


def _activation_stats(model: onnx.ModelProto, wanted: dict, ctx: PassContext,
                      mask: RowMask | None = None) -> dict[str, ActivationStats]:
    """Per-channel statistics of the `wanted` tensors, batch by batch (only sums are kept); with
    `mask`, over the positions it keeps where it applies."""
    names = list(wanted)
    stats = {n: ActivationStats(len(wanted[n].atoms)) for n in names}
    for feed, values in stream(model, ctx.data, names, desc="activation statistics"):
        for name in names:
            value, axis = values[name], wanted[name].axis
            keep = mask.keep(feed, np.shape(value), axis) if mask is not None else None
            stats[name].update(value, axis, keep)
    return stats


def _pieces(an: Analysis) -> list[tuple[np.ndarray, str]]:
    """Channel lists that must keep at least one channel: layer inputs, Split/Slice pieces, reshaped axes."""
    pieces = [(site.chan.atoms, f"the input of {node_label(site.node)}") for site in an.folds]
    for e in an.edits:
        if e.kind == "split":
            start = 0
            for size in e.data["sizes"]:
                pieces.append((e.atoms[start:start + size], f"a piece of the Split {node_label(e.node)}"))
                start += size
        elif e.kind == "slice":
            pieces.append((e.atoms[e.data["start"]:e.data["end"]], f"the slice taken by {node_label(e.node)}"))
        else:
            pieces.append((e.atoms, f"the output of {node_label(e.node)}"))
    return pieces


def _apply_zero(an: Analysis, dead: set[int], namer: Namer) -> dict[int, gs.Node]:
    """mode=zero: the producers' filters of dead channels become 0 (shapes kept)."""
    touched = {}
    for p in an.producers:
        mask = an.dead_mask(p.atoms, dead)
        w = np.array(constant(p.node.inputs[1]), copy=True)
        rows = np.moveaxis(w, p.weight_axis, 0)
        if not mask.any() or not np.any(rows[mask]):
            continue
        rows[mask] = 0
        p.node.inputs[1] = gs.Constant(namer(f"{node_label(p.node)}.weight_zeroed"), w)
        touched[id(p.node)] = p.node
    return touched


class _Remover:
    """mode=remove: fold the dead channels' constants into consumer biases, then slice everything.

    All arithmetic reads the original constants (folds first, slicing after), and every changed
    input gets a fresh constant: weights are never edited in place.
    """

    def __init__(self, graph: gs.Graph, an: Analysis, dead: set[int], namer: Namer, report: PassReport):
        self.graph, self.an, self.dead, self.namer, self.report = graph, an, dead, namer, report
        self.work: dict[tuple[int, int], np.ndarray] = {}
        self.owned: set[tuple[int, int]] = set()  # keys whose work value is a private float64 (or integer) copy
        self.dtypes: dict[tuple[int, int], np.dtype] = {}
        self.nodes: dict[int, gs.Node] = {}
        self.extra: list[Slice] = []
        self.out_atoms = {id(p.node): p.atoms for p in an.producers}

    def fresh(self, node: gs.Node, suffix: str) -> str:
        return self.namer(f"{node_label(node)}.{suffix}")

    def array(self, node: gs.Node, index: int) -> np.ndarray:
        """The working value for arithmetic (folds): a private copy, float64 for float weights."""
        key = (id(node), index)
        value = self.current(node, index)
        if key not in self.owned:
            self.work[key] = np.array(value, dtype=np.float64 if value.dtype.kind == "f" else value.dtype, copy=True)
            self.owned.add(key)
        return self.work[key]

    def current(self, node: gs.Node, index: int) -> np.ndarray:
        """The working value as it stands (the weight itself, in its dtype, until edited): slicing
        is exact in any dtype, and a weight only sliced never needs a float64 copy of itself."""
        key = (id(node), index)
        if key not in self.work:
            value = constant(node.inputs[index])
            self.dtypes[key] = value.dtype
            self.work[key] = value
            self.nodes[id(node)] = node
        return self.work[key]

    def put(self, node: gs.Node, index: int, value: np.ndarray, dtype: np.dtype) -> None:
        """Store a folded bias; one that is new or grew to per-channel follows the node's output channels."""
        key = (id(node), index)
        old_shape = self.work[key].shape if key in self.work else None
        self.work[key] = value
        self.owned.add(key)
        self.dtypes.setdefault(key, dtype)
        self.nodes[id(node)] = node
        atoms = self.out_atoms.get(id(node))
        if old_shape != value.shape and atoms is not None and value.ndim and value.shape[-1] == len(atoms):
            self.extra.append(Slice(node, index, value.ndim - 1, atoms))

    def apply(self) -> dict[int, gs.Node]:
        for site in self.an.folds:
            self.fold(site)
        for s in [*self.an.slices, *self.extra]:
            keep = ~self.an.dead_mask(s.atoms, self.dead)
            if not keep.all():
                key = (id(s.node), s.index)
                value = self.work[key] = np.compress(keep, self.current(s.node, s.index), axis=s.axis)
                if value.dtype.kind == "f" and value.dtype != np.float64:
                    self.owned.discard(key)  # a new array, but in float32: arithmetic widens it first
                else:
                    self.owned.add(key)
        for e in self.an.edits:
            self.edit(e)
        for node_id, index in list(self.work):
            value = self.work.pop((node_id, index))  # one working copy at a time next to the new weights
            node = self.nodes[node_id]
            const = gs.Constant(self.fresh(node, f"in{index}_pruned"),
                                np.ascontiguousarray(value.astype(self.dtypes[(node_id, index)])))
            del value
            while len(node.inputs) < index:
                node.inputs.append(gs.Variable.empty())
            if index < len(node.inputs):
                node.inputs[index] = const
            else:
                node.inputs.append(const)
        return dict(self.nodes)

    def fold(self, site) -> None:
        mask = self.an.dead_mask(site.chan.atoms, self.dead)
        if not mask.any():
            return
        node = site.node
        values = site.chan.value[mask]
        w0 = constant(node.inputs[1])
        taken = np.moveaxis(w0.astype(np.float64), site.weight_axis, 0)[mask]
        inexact = site.padded and bool(np.any(values != 0))
        if inexact or np.any(site.chan.approx[mask]):
            n_bad = int(np.count_nonzero((values != 0) if inexact else site.chan.approx[mask]))
            text = f"approximate fold into {node_label(node)}: {n_bad} removed channel(s) meet zero padding"
            if not inexact:
                text += " upstream (depthwise conv, Pad or AveragePool); no bound computed"
            if inexact and not np.any(site.chan.approx[mask]):
                taps = np.abs(taken).reshape(len(values), taken.shape[1], -1).sum(axis=2)  # [dead c, O]
                per_o = (np.abs(values)[:, None] * taps).sum(axis=0)
                text += f"; error at border pixels <= {float(per_o.max()):.3g}"
            self.report.note(text)
        if not np.any(values):
            return
        contrib = np.tensordot(values, taken, axes=1)
        has_bias = len(node.inputs) > 2 and bool(node.inputs[2].name)
        if node.op == "Conv":
            contrib = contrib.reshape(contrib.shape[0], -1).sum(axis=1)
            self.put(node, 2, (self.array(node, 2) + contrib) if has_bias else contrib, w0.dtype)
        elif node.op == "Gemm":
            contrib = contrib * float(node.attrs.get("alpha", 1.0))
            beta = float(node.attrs.get("beta", 1.0))
            if has_bias and beta != 0.0:
                self.put(node, 2, self.array(node, 2) + contrib / beta, w0.dtype)
            else:
                node.attrs["beta"] = 1.0
                self.put(node, 2, contrib, w0.dtype)
        else:
            self.matmul_bias(node, contrib, w0.dtype)

    def matmul_bias(self, node: gs.Node, contrib: np.ndarray, dtype: np.dtype) -> None:
        """Add the contribution to the Add that follows the MatMul, or insert one."""
        out = node.outputs[0]
        n = len(contrib)
        readers = out.outputs
        if not is_graph_output(self.graph, out) and len(readers) == 1 and readers[0].op == "Add" \
                and len(readers[0].inputs) == 2 and (readers[0].inputs[0] is out) != (readers[0].inputs[1] is out):
            add = readers[0]
            other = 1 if add.inputs[0] is out else 0
            k = constant(add.inputs[other])
            if k is not None and k.dtype.kind == "f" and used_once(add.inputs[other]) \
                    and (k.ndim == 0 or k.shape[-1] in (1, n)):
                self.out_atoms.setdefault(id(add), self.out_atoms.get(id(node)))
                self.put(add, other, self.array(add, other) + contrib, k.dtype)
                return
        mid = gs.Variable(self.namer(f"{out.name}_nobias"), dtype=out.dtype)
        node.outputs[0] = mid
        placeholder = gs.Constant(self.namer(f"{node_label(node)}.bias"), np.zeros(1, dtype))
        add = gs.Node("Add", self.namer(f"{node_label(node)}_bias"), inputs=[mid, placeholder], outputs=[out])
        self.graph.nodes.append(add)
        if id(node) in self.out_atoms:
            self.out_atoms[id(add)] = self.out_atoms[id(node)]
        self.put(add, 1, contrib.copy(), dtype)

    def edit(self, e) -> None:
        keep = ~self.an.dead_mask(e.atoms, self.dead)
        if keep.all():
            return
        node = e.node
        self.nodes[id(node)] = node
        if e.kind == "group":
            node.attrs["group"] = int(keep.sum())
        elif e.kind == "split":
            sizes, start = [], 0
            for s in e.data["sizes"]:
                sizes.append(int(keep[start:start + s].sum()))
                start += s
            value = np.array(sizes, np.int64)
            if len(node.inputs) > 1 and node.inputs[1].name:
                node.inputs[1] = gs.Constant(self.fresh(node, "split_pruned"), value)
            elif (self.graph.opset or 13) >= 13:
                node.attrs.pop("num_outputs", None)
                if len(node.inputs) > 1:
                    node.inputs[1] = gs.Constant(self.fresh(node, "split_pruned"), value)
                else:
                    node.inputs.append(gs.Constant(self.fresh(node, "split_pruned"), value))
            else:
                node.attrs["split"] = sizes
        elif e.kind == "slice":
            pos = e.data["pos"]
            for index, bound in ((1, e.data["start"]), (2, e.data["end"])):
                value = np.array(constant(node.inputs[index]), copy=True).reshape(-1)
                value[pos] = int(keep[:bound].sum())
                node.inputs[index] = gs.Constant(self.fresh(node, "bound_pruned"), value)
        elif e.kind == "reshape":
            target = np.array(constant(node.inputs[1]), copy=True).reshape(-1)
            target[e.data["axis"]] = int(keep.sum())
            node.inputs[1] = gs.Constant(self.fresh(node, "shape_pruned"), target)


def unit_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every input's shape with each dynamic dimension bound to 1 (MACs per sample and token)."""
    return {spec.name: tuple(d if isinstance(d, int) else 1 for d in spec.shape) for spec in input_specs(model)}


def _layer_table(model: onnx.ModelProto) -> tuple[dict[str, tuple[int, int | None]], str]:
    """node name → (parameters read, MACs) with count_params' rule (INT64 shape tensors excluded)."""
    sizes = {t.name: (int(np.prod(t.dims)), t.data_type) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    sizes[node.output[0]] = (int(np.prod(a.t.dims)), a.t.data_type)
    note = ""
    try:
        macs = {layer.name: layer.macs for layer in layer_macs(model)}
    except Exception:  # a dynamic dim other than the batch: count MACs with it bound to 1
        try:
            macs = {layer.name: layer.macs for layer in layer_macs(model, unit_shapes(model))}
            note = " (MACs with every dynamic dimension bound to 1)"
        except Exception:  # shape inference fails on some exotic models; parameters still stand
            macs, note = {}, " (MACs unavailable: shape inference failed)"
    table = {}
    for node in model.graph.node:
        params = sum(sizes[i][0] for i in node.input if i in sizes and sizes[i][1] != onnx.TensorProto.INT64)
        table[node.name] = (params, macs.get(node.name))
    return table, note


def _report_layers(report: PassReport, original: onnx.ModelProto, before: onnx.ModelProto, after: onnx.ModelProto,
                   touched: dict[int, gs.Node], action: str) -> None:
    """One entry per changed node: parameters and MACs before/after (they add up to the model's change)."""
    (tb, _), (ta, note) = _layer_table(before), _layer_table(after)
    order = {name: i for i, name in enumerate(ta)}
    names = sorted({n.name for n in touched.values()} | (set(ta) - set(tb)), key=lambda n: order.get(n, -1))
    for name in names:
        pb, mb = tb.get(name, (0, 0))
        pa, ma = ta.get(name, (0, 0))
        entry = {"action": action if name in tb else "inserted bias", "params_before": pb, "params_after": pa}
        if mb is not None or ma is not None:
            entry.update(macs_before=mb or 0, macs_after=ma or 0)
        report.rewrite(name, **entry)
    p0, p1 = count_params(original), count_params(after)
    m0 = sum(m for _, m in tb.values() if m)
    m1 = sum(m for _, m in ta.values() if m)
    report.note(f"parameters {p0} → {p1} ({p1 - p0:+d}); MACs {m0} → {m1} ({m1 - m0:+d}){note}")
