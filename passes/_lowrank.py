"""What the two low-rank passes (`factorize_gemm`, `factorize_conv`) share.

- `LowRankPass`: the options common to both (rank selection, alignment, the latency gate, the
  weight-error limit, layer selection) and their validation.
- Layer selection by node name (`include`/`exclude` globs) and minimum size.
- Shapes: every input bound to batch 1 (dynamic dims other than the batch taken from the
  calibration data when the pipeline supplies it), shapes inferred, read into a name → shape map.
- Rank choice: a `RankProblem` describes one layer (rank bounds, cost of a rank, spectra-based
  rules as callables); `choose_ranks` applies the selected rule and the 16-alignment, `judge`
  decides whether the chosen rank saves and passes the latency gate.
- `Plan` and `apply_plan`: a layer replaced by a chain of new nodes, the last of which writes the
  original output tensor, with fresh initializer names.

The latency-gate thresholds are measured facts of onnxruntime's CPU provider at batch 1
(docs/design.md, facts 2 and 3, with the benchmarks that show them).
"""

from __future__ import annotations

import fnmatch
import gc
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graph_opt.budget import Budgeted, run_budget
from graph_opt.data import input_specs
from graph_opt.intermediates import second_moments
from graph_opt.row_mask import AUTO, RowMask, resolve as resolve_row_mask
from graph_opt.kernels.rank import Cost, rank_for_energy, rank_for_ratio, round_rank
from graph_opt.gs_convert import to_graph, to_model, weights_on_disk
from graph_opt.pass_base import PassContext, PassReport
from graph_opt.passes._graph import node_label, report_subgraphs
from graph_opt.stats import bound_model
from graph_opt.onnx_util import Namer, first_line


log = logging.getLogger(__name__)

Ranks = tuple[int, ...]

# Rank selection when no rank option is given: each layer keeps at most half its MACs.
DEFAULT_MACS_RATIO = 0.5
# Latency gate (docs/design.md, fact 3): a rewrite above this MAC ratio gains nothing once
# the extra nodes' overhead is paid.
GATE_MAX_MACS_RATIO = 0.8
# k×k convs: stems (≤ 3 input channels) lose fidelity and gain no time; under 32 channels on
# either side (per group) the blocked layout leaves nothing to gain.
GATE_STEM_CHANNELS = 3
GATE_MIN_CONV_CHANNELS = 32
# Matrix products (Gemm, MatMul, 1×1 convs): under 64 on either side the two thinner products
# cost about what the one did (docs/design.md, fact 3).
GATE_MIN_MATMUL_DIM = 64


@dataclass(frozen=True)
class Selection:
    """The rank rule in force: kind and value(s); `default` when no rank option was given."""

    kind: Literal["rank", "rank_ratio", "energy", "auto", "budget"]
    value: Any = None
    params_ratio: float | None = None
    macs_ratio: float | None = None
    default: bool = False

    @property
    def needs_macs(self) -> bool:
        return self.kind == "budget" and self.macs_ratio is not None

    def describe(self) -> str:
        if self.kind == "budget":
            parts = [f"params_ratio={self.params_ratio}"] if self.params_ratio is not None else []
            parts += [f"macs_ratio={self.macs_ratio}"] if self.macs_ratio is not None else []
            return ",".join(parts) + (" (default)" if self.default else "")
        if self.kind == "auto":
            return "rank=auto (VBMF)"
        return f"{self.kind}={self.value}"


@dataclass(frozen=True, kw_only=True)
class LowRankPass(Budgeted):
    """Options shared by the low-rank passes (not registered itself).

    With ``target_macs``/``target_params``/``min_snr_db`` (graph_opt/budget.py) the per-layer
    levels are MAC ratios (``levels``, default 0.75, 0.625, 0.5, 0.375, 0.25: steps of 1/8, so that a
    layer holding most of the MACs does not overshoot the target by a quarter of them; parameter ratios for
    ``target_params``), chosen per layer from its measured sensitivity.
    """

    rank: int | Literal["auto"] | None = None
    rank_ratio: float | None = None
    energy: float | None = None
    params_ratio: float | None = None
    macs_ratio: float | None = None
    align: int = 16
    latency_gate: bool = True
    max_weight_error: float | None = None
    op_types: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_params: int = 0
    min_macs: int = 0
    require_saving: bool = True  # False: rewrite even when the factors are not smaller (full-rank checks)
    data: Literal["auto", "whitened", "plain"] = "auto"
    row_mask: str | None = AUTO  # graph input whose 0 entries leave positions out of the statistics

    supported_ops: ClassVar[tuple[str, ...]] = ()
    default_levels: ClassVar[tuple[float, ...]] = (0.75, 0.625, 0.5, 0.375, 0.25)
    level_name: ClassVar[str] = "MAC ratio"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank is not None and self.rank != "auto":
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise ValueError(f"rank must be a positive integer or 'auto', got {self.rank!r}")
        for opt in ("rank_ratio", "energy", "params_ratio", "macs_ratio"):
            value = getattr(self, opt)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{opt} must be in (0, 1], got {value}")
        given = [opt for opt in ("rank", "rank_ratio", "energy") if getattr(self, opt) is not None]
        if self.params_ratio is not None or self.macs_ratio is not None:
            given.append("params_ratio/macs_ratio")
        if len(given) > 1:
            raise ValueError(f"give one rank rule, not {' and '.join(given)}")
        if given and self.budgeted:
            raise ValueError(f"target_macs/target_params/min_snr_db choose the ranks: drop {given[0]}")
        if self.align < 0:
            raise ValueError(f"align must be ≥ 0 (0 or 1 disables it), got {self.align}")
        if self.max_weight_error is not None and self.max_weight_error <= 0:
            raise ValueError(f"max_weight_error must be > 0, got {self.max_weight_error}")
        unknown = [op for op in self.op_types if op not in self.supported_ops]
        if unknown:
            raise ValueError(f"op_types {', '.join(unknown)} not supported (choose from {', '.join(self.supported_ops)})")
        if self.min_params < 0 or self.min_macs < 0:
            raise ValueError("min_params and min_macs must be ≥ 0")

    def selection(self) -> Selection:
        if self.rank == "auto":
            return Selection("auto")
        if self.rank is not None:
            return Selection("rank", int(self.rank))
        if self.rank_ratio is not None:
            return Selection("rank_ratio", self.rank_ratio)
        if self.energy is not None:
            return Selection("energy", self.energy)
        if self.params_ratio is not None or self.macs_ratio is not None:
            return Selection("budget", params_ratio=self.params_ratio, macs_ratio=self.macs_ratio)
        return Selection("budget", macs_ratio=DEFAULT_MACS_RATIO, default=True)

    def statistics(self, model: onnx.ModelProto, ctx: PassContext, report: PassReport, requests: set[tuple[str, int]]
                   ) -> tuple[dict[tuple[str, int], np.ndarray], RowMask | None]:
        """The input second moments data-aware factorization uses (`intermediates.second_moments`) and
        the row mask they were counted under, or ({}, None) when the factors truncate the weights:
        ``data=plain``, ``auto`` without user data, a budgeted run (its per-level runs collect them, once)."""
        if self.budgeted or self.data == "plain" or (self.data == "auto" and not real_data(ctx)):
            return {}, None
        if ctx.data is None:
            report.note("data=whitened without calibration data: the factors truncate the weights")
            return {}, None
        mask, why = resolve_row_mask(self.row_mask, model, ctx.data)
        if why:
            report.note(why)
        grams = second_moments(model, ctx.data, requests, mask)
        report.note(f"data-aware: the factors minimize each layer's output error on {len(ctx.data)} calibration "
                    f"samples ({len(grams)} input statistics)" + (f"; {mask.describe()}" if mask else ""))
        return grams, mask

    # -- budgets (graph_opt/budget.py) -----------------------------------------------------

    def budget_levels(self) -> tuple[float, ...]:
        return tuple(sorted(self.levels or self.default_levels, reverse=True))

    def at_level(self, level: float, include: tuple[str, ...]) -> LowRankPass:
        field = "params_ratio" if self.target_params is not None else "macs_ratio"
        return self.cleared(**{field: level}, include=include or self.include)

    def budget_units(self, report: PassReport) -> list[tuple[str, tuple[str, ...]]]:
        return [(e["node"], (e["node"],)) for e in report.rewritten]

    # -- the shared run loop ---------------------------------------------------------------

    def rewrite_layers(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext,
                       match: Callable[[gs.Node, dict, str], Plan | str]) -> onnx.ModelProto:
        """Match every candidate node (pure: a Plan or a skip reason), then apply the plans."""
        if self.budgeted:
            return run_budget(self, model, report, ctx)
        graph = to_graph(model)
        report_subgraphs(graph, report, self.op_types)
        shapes, note = infer_shapes(model, ctx)
        if note:
            report.note(note)
        namer = Namer(graph)
        for node in list(graph.nodes):
            if node.op not in self.op_types:
                continue
            label = node_label(node)
            plan = match(node, shapes, label)
            if isinstance(plan, str):
                report.skip(label, plan)
                continue
            new_nodes, output = apply_plan(graph, namer, plan)
            report.rewrite(label, **plan.details, new_nodes=new_nodes, output=output)
            if weights_on_disk(graph):  # free the replaced weight now (a graphsurgeon reference cycle),
                del plan                # not after every layer of a model over 2 GB was read
                gc.collect()
        if not report.rewritten:
            return model
        graph.cleanup().toposort()
        return to_model(graph, model)

    def decide(self, problem: RankProblem) -> RankChoice | str:
        """The ranks for a layer (rule, alignment) if they save and pass the gate, else why not."""
        choice = choose_ranks(self, problem)
        if isinstance(choice, str):
            return choice
        return judge(self, problem, choice.ranks) or choice

    # -- layer selection -------------------------------------------------------------------

    def name_filter(self, label: str) -> str | None:
        """Why the layer is not selected by name, or None."""
        if FACTOR_NAME.search(label):
            # Factorizing a factor again (e.g. the 1x1 convs Tucker-2 made) compounds the error
            # for little saving: the factors are already thin.
            return "already a low-rank factor from an earlier factorization"
        if self.include and not any(fnmatch.fnmatchcase(label, p) for p in self.include):
            return f"name matches no include pattern ({', '.join(self.include)})"
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(label, pattern):
                return f"name matches exclude pattern {pattern!r}"
        return None

    def size_filter(self, reference: Cost, macs_known: bool) -> str | None:
        """Why the layer is below the minimum size, or None."""
        if reference.params < self.min_params:
            return f"{reference.params} weight parameters < min_params={self.min_params}"
        if self.min_macs:
            if not macs_known:
                return "activation shape not inferred, so min_macs cannot be checked"
            if reference.macs < self.min_macs:
                return f"{reference.macs} MACs < min_macs={self.min_macs}"
        return None

    def shape_requirement(self, macs_known: bool) -> str | None:
        """Why a layer whose shapes were not inferred cannot be judged, or None."""
        if macs_known:
            return None
        if self.selection().needs_macs:
            return ("activation shape not inferred, so macs_ratio cannot be applied (bind the dynamic "
                    "input dims, or choose rank=/rank_ratio=/energy=/params_ratio=)")
        if self.latency_gate:
            return "activation shape not inferred, so the latency gate cannot judge the layer (bind the dynamic input dims, or latency_gate=false)"
        return None


# ---------------------------------------------------------------------------------------------
# Shapes


def infer_shapes(model: onnx.ModelProto, ctx: PassContext) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """name → concrete shape (batch 1) for every tensor whose shape inference resolved; a note
    instead when it failed. Dynamic non-batch dims are taken from `ctx.data` when it has them."""
    overrides: dict[str, tuple[int, ...]] = {}
    if ctx.data is not None:
        feed = ctx.data.sample(0)  # one run's feed: every input's batch axis (not always axis 0) cut to one run
        for spec in input_specs(model):
            arr = feed.get(spec.name)
            if arr is None or np.ndim(arr) != len(spec.shape) or all(isinstance(d, int) for d in spec.shape[1:]):
                continue
            overrides[spec.name] = tuple(
                d if isinstance(d, int) else (1 if axis == 0 else int(arr.shape[axis]))
                for axis, d in enumerate(spec.shape))
    try:
        bound = bound_model(model, overrides or None)
    except Exception as exc:  # a DataError for unbound dims, or shape inference giving up
        first = first_line(exc, 200)
        return {}, f"shapes not inferred ({first}); layers that need MACs are skipped"
    out: dict[str, tuple[int, ...]] = {}
    for value in [*bound.graph.value_info, *bound.graph.input, *bound.graph.output]:
        t = value.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") and d.dim_value > 0 for d in t.shape.dim):
            out[value.name] = tuple(int(d.dim_value) for d in t.shape.dim)
    return out, None


# ---------------------------------------------------------------------------------------------
# Input statistics (data-aware factorization)

def real_data(ctx: PassContext) -> bool:
    """Calibration data the user gave (not the seeded random inputs made when none was)."""
    return ctx.data is not None and not ctx.data.seeded_random


# ---------------------------------------------------------------------------------------------
# Rank choice


@dataclass(frozen=True)
class RankProblem:
    """One layer as rank selection sees it; ranks are tuples (Tucker-2 has two, the rest one).

    full: the largest rank the decomposition accepts, per component.
    ratio_base: what `rank_ratio` multiplies (the full rank, except for CP: its break-even rank).
    cost: params and MACs of the factorized layer at the given ranks (every group included).
    reference: the original layer's. macs_known: False when shapes were not inferred (the MACs
    in `cost`/`reference` are then stand-ins and only parameters are compared).
    energy / auto / budget: the spectrum-, VBMF- and budget-based rules; `energy`/`auto` None
    when the method has no spectrum to use.
    """

    full: Ranks
    ratio_base: Ranks
    cost: Callable[[Ranks], Cost]
    reference: Cost
    macs_known: bool
    budget: Callable[[float | None, float | None], Ranks]
    energy: Callable[[float], Ranks] | None = None
    auto: Callable[[], Ranks] | None = None


@dataclass(frozen=True)
class RankChoice:
    ranks: Ranks
    rule: str
    cost: Cost


def choose_ranks(opts: LowRankPass, problem: RankProblem) -> RankChoice | str:
    """Ranks by the selected rule, then aligned to `opts.align` where that is still acceptable
    (saves, and passes the gate when on). A returned string is the reason no rank was found."""
    sel = opts.selection()
    mode = "up"
    if sel.kind == "rank":
        ranks = tuple(min(sel.value, f) for f in problem.full)
        mode = "none"  # an explicit rank is taken as given
    elif sel.kind == "rank_ratio":
        ranks = tuple(min(rank_for_ratio(b, sel.value), f) for b, f in zip(problem.ratio_base, problem.full))
    elif sel.kind == "energy":
        if problem.energy is None:
            return "energy= needs a spectrum this method does not have"
        ranks = problem.energy(sel.value)
        if min(ranks) < 1:
            return "weight is all zeros"
    elif sel.kind == "auto":
        if problem.auto is None:
            return "rank=auto is not defined for this method"
        ranks = problem.auto()
        if min(ranks) < 1:
            return f"VBMF finds no component above the noise (ranks {fmt_ranks(ranks)})"
    else:
        ranks = problem.budget(sel.params_ratio, sel.macs_ratio)
        if min(ranks) < 1:
            return f"no rank fits the budget {sel.describe()}"
        mode = "down"
    rule = sel.describe()
    if opts.align > 1 and mode != "none":
        aligned = tuple(_align(r, f, opts.align, mode) for r, f in zip(ranks, problem.full))
        if aligned != ranks and judge(opts, problem, aligned) is None:
            return RankChoice(aligned, f"{rule}, aligned to {opts.align}", problem.cost(aligned))
    return RankChoice(ranks, rule, problem.cost(ranks))


def _align(r: int, full: int, multiple: int, mode: str) -> int:
    """'up': the next multiple when within `full` (a target rank is a floor). 'down': the
    multiple below (a budget rank is a ceiling); below one multiple, the first multiple, since a
    rank under the block size costs the block anyway (docs/design.md, fact 2); the caller checks it saves."""
    if mode == "down" and r >= multiple:
        return r // multiple * multiple
    return round_rank(r, max_rank=full, multiple=multiple)


def judge(opts: LowRankPass, problem: RankProblem, ranks: Ranks) -> str | None:
    """Why the layer is not rewritten at `ranks` (no saving, or the latency gate), else None."""
    c, ref = problem.cost(ranks), problem.reference
    if opts.require_saving and (c.params >= ref.params or (problem.macs_known and c.macs >= ref.macs)):
        macs = f", MACs {ref.macs} → {c.macs}" if problem.macs_known else ""
        return f"no saving at rank {fmt_ranks(ranks)}: params {ref.params} → {c.params}{macs}"
    if opts.latency_gate and problem.macs_known:
        ratio = c.macs / max(ref.macs, 1)
        if ratio > GATE_MAX_MACS_RATIO:
            return (f"latency gate: MAC ratio {ratio:.2f} > {GATE_MAX_MACS_RATIO} at rank "
                    f"{fmt_ranks(ranks)} does not pay on onnxruntime CPU")
    return None


def fmt_ranks(ranks: Ranks) -> str:
    return "x".join(str(r) for r in ranks)


def group_max(values: list[Ranks]) -> Ranks:
    """Per-component maximum over groups (every group gets at least what it asked for)."""
    return tuple(max(v[i] for v in values) for i in range(len(values[0])))


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    return rank_for_energy(singular_values, energy)


# ---------------------------------------------------------------------------------------------
# Rewriting


@dataclass
class Step:
    """One node of the replacement chain: `op` reading the previous output and `weight`."""

    op: str
    weight: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    weight_first: bool = False  # MatMul with the constant on the left


@dataclass
class Plan:
    """A matched layer and its replacement, decided before any graph edit."""

    node: gs.Node
    activation: gs.Tensor
    steps: list[Step]
    tail: list[gs.Tensor]  # extra inputs of the last step (bias)
    suffix: str  # node names are <original>/<suffix>_<i>
    details: dict[str, Any]


# Names apply_plan gives the nodes it creates: <original>/<suffix>_<i>.
FACTOR_NAME = re.compile(r"/(svd|tucker2|cp|spatial_svd)_\d+$")


def base_name(node: gs.Node) -> str:
    return node.name or (node.outputs[0].name if node.outputs else node.op)


def apply_plan(graph: gs.Graph, namer: Namer, plan: Plan) -> tuple[list[str], str]:
    """Replace `plan.node` by its chain; returns the new node names and the output tensor name."""
    node, x = plan.node, plan.activation
    out = node.outputs[0]
    dtype = out.dtype if out.dtype is not None else plan.steps[-1].weight.dtype
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.remove(node)
    base = base_name(node)
    names = []
    for i, step in enumerate(plan.steps):
        last = i == len(plan.steps) - 1
        name = namer(f"{base}/{plan.suffix}_{i}")
        weight = gs.Constant(namer(f"{name}.weight"), np.ascontiguousarray(step.weight))
        y = out if last else gs.Variable(namer(f"{name}_out"), dtype=dtype)
        inputs = [weight, x] if step.weight_first else [x, weight]
        if last:
            inputs += plan.tail
        graph.nodes.append(gs.Node(step.op, name, dict(step.attrs), inputs, [y]))
        names.append(name)
        x = y
    return names, out.name


def float_dtype_reason(w: np.ndarray) -> str | None:
    if w.dtype not in (np.float16, np.float32, np.float64):
        return f"weight dtype {w.dtype} is not float16/32/64"
    # The decompositions need a finite, non-empty weight (they raise on anything else).
    if w.size == 0:
        return f"weight of shape {list(w.shape)} is empty (zero-sized)"
    if not np.all(np.isfinite(w)):
        return "weight contains NaN or inf"
    return None


def prod(values) -> int:
    return int(math.prod(int(v) for v in values))
