"""Automatic per-layer budgets: one global target instead of per-layer numbers.

The passes that compress layer by layer (`factorize_gemm`, `factorize_conv`, `prune_channels`)
accept ``target_macs=`` or ``target_params=`` (a fraction of the totals of the model the pass
receives) and/or ``min_snr_db=`` (a fidelity floor: the SNR of every model output against the
pass's input model, on the calibration data). With any of them the pass runs here:

1. **Units and levels.** A *unit* is what the pass compresses as one piece: a layer for the
   low-rank passes, a group of tied channels for `prune_channels`. Its *levels* go from mild to
   harsh (``levels=``: MAC ratios for low-rank, pruning ratios for channels). The units are what
   the pass rewrites when run at each level on the whole model.
2. **Sensitivity curves.** Each unit is compressed alone at each level (the pass with
   ``include=`` the unit's node names) and the candidate is run on the calibration data
   (`budget_samples` of them): the SNR of the outputs against the pass input, and the saving in
   MACs and parameters. Curves are cached on disk (`$GRAPH_OPT_CACHE`, else
   ``~/.cache/graph-opt``), keyed by the model, the pass options, the unit, the level and the
   data, so `compare` and repeated runs measure each point once.
3. **Allocation**, greedy on the curves as AIMET's compression-ratio selection does: for a
   fidelity threshold t every unit takes its harshest level whose SNR is at least t; lowering t
   only adds savings, so the highest t whose savings meet the target is taken. The target is then
   met to within one unit's step (the last level change). With only a floor, t is the lowest whose
   predicted end-to-end SNR meets it; the prediction adds the units' relative noise powers
   (10^(-SNR/10)), which holds when their errors are independent.
4. **Apply and verify.** The pass runs once per level with ``include=`` the units at that level;
   savings that do not add up (two pruned groups meeting in one conv) are measured, and a target
   still missed moves t down until it is met. The result is run end to end on the calibration
   data; below the floor the unit with the lowest SNR at its level *backs off* one level (to
   float after its mildest), until the floor holds. When both a target and a floor are given and
   cannot both hold, the floor wins and the report says how far the target was missed.

`quantize` uses `hold_floor` for ``min_snr_db`` (mixed precision): the layers it quantized,
least robust first by their own measured SNR, are kept in float, as few as hold the floor
(bisection on their number, each candidate checked end to end).

The report carries every unit's curve and chosen level (``budget`` entries in the notes and a
``budget_level`` in each rewrite).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from graph_opt.data import Dataset, random_dataset
from graph_opt.model_io import update_digest
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.progress import progress
from graph_opt.stats import model_stats
from graph_opt.verify import Reference

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class Budgeted(Pass):
    """The budget options a layer-wise pass gains (see the module docstring)."""

    target_macs: float | None = None
    target_params: float | None = None
    min_snr_db: float | None = None
    levels: tuple[float, ...] = ()
    budget_samples: int = 64

    default_levels: ClassVar[tuple[float, ...]] = ()
    level_name: ClassVar[str] = "level"

    def __post_init__(self) -> None:
        for opt in ("target_macs", "target_params"):
            value = getattr(self, opt)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{opt} must be in (0, 1], got {value}")
        if self.target_macs is not None and self.target_params is not None:
            raise ValueError("give one of target_macs and target_params, not both")
        if self.min_snr_db is not None and not math.isfinite(self.min_snr_db):
            raise ValueError(f"min_snr_db must be a finite number of dB, got {self.min_snr_db}")
        if any(not 0.0 < v < 1.0 for v in self.levels):
            raise ValueError(f"levels must lie in (0, 1), got {', '.join(map(str, self.levels))}")
        if self.budget_samples < 1:
            raise ValueError(f"budget_samples must be ≥ 1, got {self.budget_samples}")

    @property
    def budgeted(self) -> bool:
        return self.target_macs is not None or self.target_params is not None or self.min_snr_db is not None

    def budget_levels(self) -> tuple[float, ...]:
        """Levels from mildest to harshest."""
        raise NotImplementedError

    def at_level(self, level: float, include: tuple[str, ...]) -> Pass:
        """This pass with the budget options cleared, compressing only `include` at `level`."""
        raise NotImplementedError

    def budget_units(self, report: PassReport) -> list[tuple[str, tuple[str, ...]]]:
        """(unit label, node names) of every unit a report rewrote."""
        raise NotImplementedError

    def cleared(self, **changes: Any) -> Pass:
        return dataclasses.replace(self, target_macs=None, target_params=None, min_snr_db=None, **changes)


def exact_pattern(name: str) -> str:
    """An fnmatch pattern matching exactly `name` (brackets around the special characters)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# ---------------------------------------------------------------------------------------------


@dataclass
class Point:
    """One unit compressed alone at one level."""

    level: float
    snr_db: float
    macs_saved: int
    params_saved: int


@dataclass
class Unit:
    label: str
    names: tuple[str, ...]
    points: list[Point] = field(default_factory=list)  # mildest first

    def at(self, level: float | None) -> Point | None:
        return next((p for p in self.points if p.level == level), None)


@dataclass
class Costs:
    macs: int | None
    params: int


def _costs(model: onnx.ModelProto) -> Costs:
    stats = model_stats(model)
    return Costs(stats.macs, stats.params)


def _noise(snr: float) -> float:
    return 0.0 if snr == math.inf else 10.0 ** (-snr / 10.0)


def _snr_from_noise(noise: float) -> float:
    return math.inf if noise <= 0 else -10.0 * math.log10(noise)


class _Cache:
    """Sensitivity points on disk, one JSON file per (model, pass, data) key."""

    def __init__(self, key: str):
        root = os.environ.get("GRAPH_OPT_CACHE") or str(Path.home() / ".cache" / "graph-opt")
        self.path = Path(root) / "sensitivity" / f"{key}.json"
        try:
            self.points = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            self.points = {}  # a damaged cache is only a slower run

    def get(self, unit: str, level: float) -> dict | None:
        return self.points.get(f"{unit}@{level!r}")

    def put(self, unit: str, level: float, value: dict) -> None:
        self.points[f"{unit}@{level!r}"] = value

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.points, default=str))
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home: the run still works, uncached
            log.info("sensitivity cache not written: %s", exc)


def _cache_key(model: onnx.ModelProto, opts: Budgeted, data: Dataset) -> str:
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}".encode())
    update_digest(h, model)
    h.update(opts.cleared(levels=()).spec().encode())
    for name in sorted(data.inputs):
        arr = np.ascontiguousarray(data.inputs[name])
        h.update(name.encode() + str(arr.shape).encode() + str(arr.dtype).encode() + arr.tobytes())
    return h.hexdigest()[:32]


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed main-graph node a unique name, so units can be selected by name."""
    taken = {n.name for n in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            base = f"{node.op_type}_{node.output[0] if node.output else i}"
            name, k = base, 1
            while name in taken:
                name, k = f"{base}_{k}", k + 1
            node.name = name
            taken.add(name)


# ---------------------------------------------------------------------------------------------


class Budget:
    """One budgeted run of a pass (see the module docstring)."""

    def __init__(self, opts: Budgeted, model: onnx.ModelProto, report: PassReport, ctx: PassContext):
        self.opts, self.report, self.ctx = opts, report, ctx
        self.model = model
        name_nodes(self.model)
        self.base = _costs(model)
        if ctx.data is not None and len(ctx.data):
            self.data = ctx.data.take(opts.budget_samples)
        else:
            self.data = random_dataset(model, min(opts.budget_samples, 16), seed=ctx.seed)
            report.note("budget: no calibration data; sensitivities measured on seeded random inputs")
        self.reference = Reference(model, self.data)
        self.levels = opts.budget_levels()

    # -- measuring -------------------------------------------------------------------------

    def _run(self, model: onnx.ModelProto, p: Pass) -> tuple[onnx.ModelProto, PassReport]:
        result = p(model, self.ctx)
        return result.model, result.report

    def units(self) -> list[Unit]:
        found: dict[str, Unit] = {}
        for level in self.levels:
            _, rep = self._run(self.model, self.opts.at_level(level, ()))
            for label, names in self.opts.budget_units(rep):
                found.setdefault(label, Unit(label, names))
        return list(found.values())

    def curves(self, units: list[Unit]) -> None:
        cache = _Cache(_cache_key(self.model, self.opts, self.data))
        todo = [(u, lv) for u in units for lv in self.levels]
        measured = 0
        for unit, level in progress(todo, total=len(todo), desc=f"{self.opts.name} sensitivity"):
            hit = cache.get(unit.label, level)
            if hit is None:
                cand, rep = self._run(self.model, self.opts.at_level(level, tuple(map(exact_pattern, unit.names))))
                if not rep.rewritten:
                    hit = {"skip": True}
                else:
                    costs = _costs(cand)
                    snr = self.reference.compare(cand).snr_db
                    hit = {"snr_db": snr if snr == math.inf or math.isfinite(snr) else -1e9,  # NaN, -inf: worst
                           "macs_saved": (self.base.macs - costs.macs) if self.base.macs is not None and
                           costs.macs is not None else 0,
                           "params_saved": self.base.params - costs.params}
                cache.put(unit.label, level, hit)
                measured += 1
            if not hit.get("skip"):
                snr = float(hit["snr_db"])
                unit.points.append(Point(level, snr, int(hit["macs_saved"]), int(hit["params_saved"])))
        if measured:
            cache.save()
        self.report.note(f"budget: {len(todo)} sensitivity points over {len(units)} units, "
                         f"{len(todo) - measured} from the cache")

    # -- allocating ------------------------------------------------------------------------

    def _saving(self, p: Point) -> int:
        return p.params_saved if self.opts.target_params is not None else p.macs_saved

    def allocate(self, units: list[Unit], threshold: float) -> dict[str, float]:
        """unit → harshest level whose SNR ≥ threshold (units with none stay uncompressed)."""
        out = {}
        for u in units:
            ok = [p for p in u.points if p.snr_db >= threshold and self._saving(p) > 0]
            if ok:
                out[u.label] = max(ok, key=lambda p: (self._saving(p), p.snr_db)).level
        return out

    def _predicted(self, units: list[Unit], levels: dict[str, float]) -> tuple[int, float]:
        by = {u.label: u for u in units}
        points = [by[label].at(lv) for label, lv in levels.items()]
        return sum(self._saving(p) for p in points), _snr_from_noise(sum(_noise(p.snr_db) for p in points))

    def required_saving(self) -> int | None:
        if self.opts.target_params is not None:
            return self.base.params - math.floor(self.opts.target_params * self.base.params)
        if self.opts.target_macs is not None:
            return self.base.macs - math.floor(self.opts.target_macs * self.base.macs)
        return None

    def thresholds(self, units: list[Unit]) -> list[float]:
        """Every distinct measured SNR, highest first (each one a place where an allocation changes)."""
        return sorted({p.snr_db for u in units for p in u.points}, reverse=True)

    # -- applying --------------------------------------------------------------------------

    def apply(self, units: list[Unit], levels: dict[str, float]) -> tuple[onnx.ModelProto, list[PassReport]]:
        model, reports = self.model, []
        names = {u.label: u.names for u in units}
        for level in self.levels:
            chosen = [label for label, lv in levels.items() if lv == level]
            if not chosen:
                continue
            include = tuple(exact_pattern(n) for label in chosen for n in names[label])
            model, rep = self._run(model, self.opts.at_level(level, include))
            reports.append(rep)
        return model, reports

    def achieved(self, model: onnx.ModelProto) -> float | None:
        """The model's MACs or params as a fraction of the pass input's (the targeted metric)."""
        costs = _costs(model)
        if self.opts.target_params is not None:
            return costs.params / max(self.base.params, 1)
        if self.opts.target_macs is not None and costs.macs is not None and self.base.macs:
            return costs.macs / self.base.macs
        return None


def run_budget(opts: Budgeted, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
    """The budgeted pass: units, curves, allocation, application with back-off (module docstring)."""
    if opts.target_macs is not None and _costs(model).macs is None:
        report.skip("model", "target_macs needs the model's MACs, but its shapes could not be inferred "
                             "(bind the dynamic input dims with --input-shape, or use target_params)")
        return model
    b = Budget(opts, model, report, ctx)
    units = b.units()
    if not units:
        report.note("budget: no layer can be compressed at any level " + ", ".join(map(str, b.levels)))
        return model
    b.curves(units)
    units = [u for u in units if u.points]
    target = opts.target_macs if opts.target_macs is not None else opts.target_params
    metric = "MACs" if opts.target_macs is not None else "params"
    need = b.required_saving()
    thresholds = b.thresholds(units)

    # The threshold: the highest meeting the target, or the lowest whose predicted SNR meets the floor.
    if need is not None:
        index = next((i for i, t in enumerate(thresholds) if b._predicted(units, b.allocate(units, t))[0] >= need),
                     len(thresholds) - 1)
    else:
        index = 0
        for i, t in enumerate(thresholds):
            if b._predicted(units, b.allocate(units, t))[1] >= opts.min_snr_db:
                index = i
    levels = b.allocate(units, thresholds[index]) if thresholds else {}
    out, reports = b.apply(units, levels)
    # Savings that do not add up: measure, and move the threshold down while the target is missed.
    while need is not None and index + 1 < len(thresholds) and (b.achieved(out) or 0.0) > target + 1e-12:
        index += 1
        levels = b.allocate(units, thresholds[index])
        out, reports = b.apply(units, levels)

    parity = b.reference.compare(out) if levels else None
    backed: list[str] = []
    if opts.min_snr_db is not None:
        by = {u.label: u for u in units}
        while levels and not parity.snr_db >= opts.min_snr_db:
            worst = min(levels, key=lambda label: by[label].at(levels[label]).snr_db)
            milder = [p.level for p in by[worst].points
                      if b._saving(p) > 0 and b.levels.index(p.level) < b.levels.index(levels[worst])]
            backed.append(f"{worst} {levels[worst]:g}→{milder[-1]:g}" if milder else f"{worst} {levels[worst]:g}→none")
            if milder:
                levels[worst] = milder[-1]
            else:
                del levels[worst]
            out, reports = b.apply(units, levels)
            parity = b.reference.compare(out) if levels else None

    _report(b, report, units, levels, reports, parity, backed, target, metric, out)
    return out if levels else model


def _report(b: Budget, report: PassReport, units: list[Unit], levels: dict[str, float], reports: list[PassReport],
            parity, backed: list[str], target: float | None, metric: str, out: onnx.ModelProto) -> None:
    by_node = {n: u.label for u in units for n in u.names}
    for rep in reports:
        for entry in rep.rewritten:
            unit = by_node.get(entry["node"]) or next((by_node[n] for n in entry.get("producers", ()) if n in by_node),
                                                      None)
            report.rewrite(entry["node"], **{k: v for k, v in entry.items() if k != "node"},
                           budget_level=levels.get(unit) if unit else None)
        report.notes.extend(rep.notes)
    for u in units:
        curve = ", ".join(f"{p.level:g}: {p.snr_db:.1f} dB / -{p.macs_saved} MACs / -{p.params_saved} params"
                          for p in u.points)
        chosen = levels.get(u.label)
        report.note(f"budget: {u.label} → {b.opts.level_name} {chosen:g}" if chosen is not None else
                    f"budget: {u.label} → kept")
        report.note(f"budget curve {u.label}: {curve}")
        if chosen is None:
            report.skip(u.label, "budget: left uncompressed (its sensitivity curve ranks it last)")
    if backed:
        report.note("budget: backed off to meet min_snr_db: " + "; ".join(backed))
    achieved = b.achieved(out) if levels else 1.0
    snr = parity.snr_db if parity is not None else math.inf
    parts = [f"budget: {len(levels)} of {len(units)} units compressed"]
    if target is not None:
        met = achieved is not None and achieved <= target + 1e-12
        parts.append(f"{metric} {achieved:.3f}× of the input (target {target:g}: {'met' if met else 'NOT met'})")
    if b.opts.min_snr_db is not None:
        parts.append(f"SNR {snr:.1f} dB on {len(b.data)} calibration samples "
                     f"(floor {b.opts.min_snr_db:g} dB: {'held' if snr >= b.opts.min_snr_db else 'NOT held'})")
    elif parity is not None:
        parts.append(f"SNR {snr:.1f} dB on {len(b.data)} calibration samples")
    report.note("; ".join(parts))


def hold_floor(reference: Reference, first: onnx.ModelProto, order: list[str],
               rebuild: Callable[[tuple[str, ...]], onnx.ModelProto], floor: float,
               report: PassReport) -> onnx.ModelProto:
    """Mixed precision under a fidelity floor: the fewest of the least robust units kept
    uncompressed so that the model's output SNR against `reference` holds `floor`.

    `order` lists the units least robust first (their own measured sensitivity); `rebuild(k)`
    gives the model with the units in `k` left uncompressed. The count is found by bisection,
    each candidate checked end to end (the SNR falls as fewer units are kept, up to noise).
    """
    snr = reference.compare(first).snr_db
    if snr >= floor:
        report.note(f"min_snr_db: SNR {snr:.1f} dB on {len(reference.data)} calibration samples holds the floor "
                    f"{floor:g} dB with every planned layer compressed")
        return first
    lo, hi = 0, len(order)  # lo fails the floor; hi (everything kept) holds it trivially
    best, best_snr = None, math.inf
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cand = rebuild(tuple(order[:mid]))
        value = reference.compare(cand).snr_db
        if value >= floor:
            hi, best, best_snr = mid, cand, value
        else:
            lo = mid
    if best is None:  # only keeping every unit holds the floor
        best = rebuild(tuple(order))
        best_snr = reference.compare(best).snr_db
    report.note(f"min_snr_db: kept {hi} of {len(order)} layers uncompressed, least robust first "
                f"({', '.join(order[:hi][:8])}{' …' if hi > 8 else ''}): SNR {snr:.1f} → {best_snr:.1f} dB on "
                f"{len(reference.data)} calibration samples (floor {floor:g} dB)")
    return best
