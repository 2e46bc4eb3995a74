"""The plan of the quantize pass: every decision made before a node is inserted.

`make_plan` (pure with respect to its model) runs the seams in order and records the outcome as
a `passes._qplan.QuantPlan` (tensor → dtype, scale, zero point, axis, block, calibrated range;
node → quantize / float / skip with the reason), which `emit.apply_plan` writes in one step:

0. with static activations: MatMul + bias Add of static shape become Gemm (`speed.gemm_form`,
   exact; onnxruntime's own MatMul + Add fusion would otherwise keep them from its integer kernels);
1. match the layers (`layers.match_layers`); the plan needs opset 13 for per-channel
   DequantizeLinear, 21 for int4 and blocks, 25 for int2; a lower model is upgraded
   (`_upgrade_opset`: an opset bump when no used op changed, else ``onnx.version_converter``,
   then checked to load) or its layers are skipped with the reason;
2. ``rounding=gptq``: the layers' input second moments in the float model (`weights.attach_hessians`);
3. the static candidates (`_candidates`): 8-bit unblocked weights with ``activations`` not
   'none' and calibration data, less the Convs on a graph input `layers.float_on_input` keeps;
   ``bias_correction``: their input channel means (`bias.attach_means`);
4. calibrate only what a dry run of the placement on stand-in ranges asks for (`_calibrate`),
   then place (`placement.place`) and quantize the weights and biases (`weights`);
5. measure the sensitivity (`sensitivity.measure`), keep the sensitive nodes float or
   weight-only, and place again when any changed; with the 'auto' threshold, a node below it on
   its own is quantized after all when the model's outputs still hold it (`_admit`);
6. ``chain``: the GPTQ layers rounded again against their inputs in the model as planned
   (`_chain`, `chain.rechain`), after the sensitivity verdicts, which judge each node's own
   rounding against its float input;
7. record the decisions, tensors and notes (`_record`).

Weight-only (DQ(weight) → float op) is the outcome for every layer when ``activations=none``,
for ternary/binary or blocked weights, for int4 unless ``activations`` names int8 or uint8 (W4A8),
and when static activations are asked for without data (with a note).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from graph_opt.data import Dataset
from graph_opt.errors import GraphOptError
from graph_opt.external_data import has_disk_weights
from graph_opt.intermediates import second_moments
from graph_opt.model_io import check_model, copy_model
from graph_opt.passes._graph import GraphIndex, all_nodes
from graph_opt.passes._qplan import NodeDecision, QuantPlan, TensorQuant
from graph_opt.passes._smooth import has_attention
from graph_opt.passes.quantize import bias, calibration, chain, search, sensitivity, speed
from graph_opt.passes.quantize.emit import apply_plan
from graph_opt.passes.quantize.layers import Layer, excluded, float_on_input, match_layers, opset_of, rematch_layers
from graph_opt.passes.quantize.placement import Placement, calibration_tensors, place
from graph_opt.passes.quantize.weights import attach_hessians, block_for, weights_and_biases
from graph_opt.runtime import make_session, release_memory
from graph_opt.verify import Reference, is_logits
from graph_opt.onnx_util import first_line

if TYPE_CHECKING:
    from graph_opt.passes.quantize import Quantize


def make_plan(model: onnx.ModelProto, data: Dataset | None, opts: Quantize, *,
              batch_size: int | None = None) -> tuple[QuantPlan, onnx.ModelProto]:
    """Decide everything (pure with respect to `model`): the plan and the model it applies to.

    The returned model is `model` itself, or a copy with MatMul + bias written as Gemm,
    upgraded to the opset the plan needs (and, with ``bias_correction``, where Conv/Gemm layers
    without a bias read a zero one).
    """
    batch_size = batch_size or opts.batch_size
    notes: list[str] = []
    source = _fingerprint(model)  # before the exact rewrites below: what a shared calibration is keyed by
    if (opts.activations != "none" and data is not None and opts.weights in ("int8", "uint8")
            and {"MatMul", "Gemm"} <= set(opts.op_types)):
        model, gemms = speed.gemm_form(model, lambda gix, idx: excluded(gix, idx, opts) is not None)
        if gemms:
            notes.append(f"{len(gemms)} MatMul + bias Add of static shape written as Gemm (exact), so that "
                         "onnxruntime fuses them into integer kernels (speed.gemm_form)")
    if opts.bias_correction and data is not None and opts.activations != "none":
        model = bias.with_zero_biases(model, opts)
    ix = GraphIndex(model)
    decisions, layers, n_qdq = match_layers(ix, opts)
    if n_qdq:
        decisions.append(NodeDecision(f"QuantizeLinear/DequantizeLinear ×{n_qdq}", "QDQ", "skip",
                                      "already quantized: existing QDQ nodes are left as they are"))
    current = opset_of(model)
    target = max(current, opts.required_opset())
    plan = QuantPlan(opset=target, nodes=decisions, notes=notes)
    if not layers:
        return plan, model

    if target > current:
        upgraded = _upgrade_opset(model, target)
        if isinstance(upgraded, str):
            plan.nodes = decisions + [NodeDecision(ix.labels[i], layers[i].op, "skip", upgraded) for i in layers]
            return plan, model
        model, how = upgraded
        notes.append(f"opset upgraded {current} → {target} ({how}); IR version {model.ir_version}")
        ix = GraphIndex(model)
        layers = rematch_layers(ix, opts)

    if opts.rounding_for(data is not None) == "gptq":
        try:
            attach_hessians(model, ix, layers, data, notes, opts, _moments(source, data, opts.threads))
        except GraphOptError as exc:  # the statistics' model does not load or run (e.g. a custom op onnxruntime lacks)
            notes.append(f"rounding=gptq not run ({exc}); weights rounded to nearest")
    candidates, forced = _candidates(ix, layers, data, opts, notes)
    if opts.bias_correction and candidates:
        bias.attach_means(model, ix, layers, candidates, data, opts, notes)
    ranges: Mapping[str, tuple[float, float]] = {}
    unasked: frozenset[str] = frozenset()
    if opts.activations != "none" and candidates:
        ranges, unasked, ok = _calibrate(model, ix, layers, candidates, forced, data, opts, batch_size, notes,
                                         source)
        if not ok:
            candidates, forced = set(), {}
    if isinstance(ranges, calibration.Ranges) and calibration.observed(opts.calibration) != "minmax":  # minmax ranges cost nothing
        ranges.prefetch(lambda r: place(ix, layers, candidates, r, opts, forced, unasked))
    pl = place(ix, layers, candidates, ranges, opts, forced, unasked)
    quantized: dict[tuple[int, bool], TensorQuant] = {}
    weights, biases = weights_and_biases(layers, pl, opts, quantized)
    if opts.calibration == "output" and data is not None and pl.acts and weights:
        ranges = _search(model, ix, layers, weights, biases, pl, ranges, data, opts, batch_size, notes, source)
        pl = place(ix, layers, candidates, ranges, opts, forced, unasked)
        weights, biases = weights_and_biases(layers, pl, opts, quantized)
    threshold = opts.threshold_db()
    sens: dict[int, dict[str, float]] = {}
    weight_only: dict[int, str] = {}
    if threshold is not None and data is not None and weights:
        try:
            sens = sensitivity.measure(model, ix, layers, weights, biases, pl, data, opts, batch_size)
        except GraphOptError as exc:  # the probe model does not load or run (e.g. a custom op onnxruntime lacks)
            notes.append(f"sensitivity not measured ({exc}); every planned node is quantized")
        release_memory()
        sensitive, weight_only = sensitivity.split_sensitive(sens, threshold, opts.sensitive)
        if sensitive and opts.sensitivity_snr_db == "auto" and opts.sensitive == "float":
            sensitive = _admit(model, ix, layers, decisions, target, candidates, ranges, forced, unasked, sensitive,
                               sens, quantized, data, threshold, opts, notes)
        forced.update(sensitive)
        if forced or weight_only:
            pl = place(ix, layers, candidates - set(weight_only), ranges, opts, forced, unasked)
            weights, biases = weights_and_biases(layers, pl, opts, quantized)
        for idx, values in sens.items():
            if idx in pl.decisions and idx not in forced:
                pl.decisions[idx].sensitivity = values
                if idx in weight_only:
                    pl.decisions[idx].reason = weight_only[idx]
        notes.append(f"sensitivity threshold {threshold:g} dB: {len(forced)} of {len(sens)} nodes kept float, "
                     f"{len(weight_only)} layers weight-only")
    # Chained last: on the final placement (a sensitivity verdict is about a node's own robustness,
    # and a chained weight aims at its quantized input, not at the float one it is measured on).
    chained = (_chain_wanted(ix, layers, data, opts, notes)
               and _chain(model, ix, layers, decisions, target, candidates - set(weight_only), ranges, forced,
                          unasked, quantized, data, opts, notes, source))
    if chained:
        weights, biases = weights_and_biases(layers, pl, opts, quantized)
    _record(plan, ix, layers, pl, forced, sens, [*weights.values(), *biases.values(), *pl.acts.values()],
            biases)
    return plan, model


# What the model's outputs must hold, above the per-node threshold, for `_admit` to quantize a
# node that fails it on its own (docs/design.md, fact 7).
ADMIT_MARGIN_DB = 10.0


def _admit(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, Layer], decisions: list[NodeDecision],
           opset: int, candidates: set[int], ranges: Mapping[str, tuple[float, float]], forced: dict[int, str],
           unasked: frozenset[str], sensitive: dict[int, str], sens: dict[int, dict[str, float]],
           quantized: dict, data: Dataset, threshold: float, opts: Quantize, notes: list[str]) -> dict[int, str]:
    """The locally sensitive nodes that stay float once their effect on the model's outputs is seen.

    A node's own SNR is measured with everything around it in float; what reaches the outputs
    can be far less (a max-pool, a normalization or a residual path dilutes it) or more. So, with
    the 'auto' threshold, the nodes below it on their own are quantized after all when the whole
    model, every other planned node quantized, still holds the threshold plus `ADMIT_MARGIN_DB` at
    its outputs (worst output SNR on ``sensitivity_samples`` samples). The margin is there because
    an output's SNR is weighted by energy: a detector's class scores sit beside box coordinates
    hundreds of times larger in one tensor, and their damage hardly moves it. A model whose every
    output is one row of scores per sample (`verify.is_logits`: a classifier's logits or
    probabilities, an embedding) has no such mix, and its top score is checked directly: there the
    floor is the weights' base threshold plus the margin (without the 7-bit grid's increment, which
    is for per-node verdicts that cannot see the noise add up; the end-to-end check sees it), and
    every check sample must keep its top score's index. Otherwise the fewest of them, least
    robust first, stay float: found by bisection, each candidate checked end to end. Nothing is
    admitted when the model misses the threshold even with every one of them float. Models whose
    weights are kept on disk are not rebuilt this way (their local verdicts stand).
    """
    if has_disk_weights(model):
        return sensitive
    order = sorted(sensitive, key=lambda i: sens[i]["snr_db"])  # least robust first
    reference = Reference(model, data.take(min(opts.max_samples, opts.sensitivity_samples)), threads=opts.threads)
    classifier = bool(reference.outputs) and all(is_logits(v) for v in reference.outputs.values())
    base = opts.threshold_db(reduced_grid=False)
    floor = (min(threshold, base) if classifier and base is not None else threshold) + ADMIT_MARGIN_DB

    def snr_keeping(kept: list[int]) -> float:
        keep = {**forced, **{i: sensitive[i] for i in kept}}
        pl = place(ix, layers, candidates, ranges, opts, keep, unasked)
        weights, biases = weights_and_biases(layers, pl, opts, quantized)
        trial = QuantPlan(opset=opset, nodes=list(decisions), notes=[])
        _record(trial, ix, layers, pl, keep, sens, [*weights.values(), *biases.values(), *pl.acts.values()], biases)
        parity = reference.compare(apply_plan(model, trial, int4_format=opts.int4_format))
        if classifier and parity.top1 is not None and parity.top1 < 1.0:
            return -math.inf  # a check sample changed its top class: not held, whatever the SNR
        return parity.snr_db

    def result(k: int, value: float) -> dict[int, str]:
        notes.append(f"sensitivity: {len(order) - k} of {len(order)} nodes below {threshold:g} dB on their own "
                     f"quantized anyway: the model's outputs hold {floor:g} dB with them ({value:.1f} dB on "
                     f"{len(reference.data)} samples{', every top class kept' if classifier else ''})")
        return {i: sensitive[i] for i in order[:k]}

    try:
        if snr_keeping(order) < floor:
            return sensitive  # the rest of the plan already misses it: admitting cannot help
        first = snr_keeping([])
        if first >= floor:
            return result(0, first)
        lo, hi, best = 0, len(order), None  # keeping order[:lo] fails; keeping order[:hi] holds
        while hi - lo > 1:
            mid = (lo + hi) // 2
            value = snr_keeping(order[:mid])
            if value >= floor:
                hi, best = mid, value
            else:
                lo = mid
    except GraphOptError as exc:  # a trial model does not load or run
        notes.append(f"sensitivity: the nodes below {threshold:g} dB stay float (end-to-end check failed: {exc})")
        return sensitive
    return sensitive if best is None else result(hi, best)


def _candidates(ix: GraphIndex, layers: dict[int, Layer], data: Dataset | None, opts: Quantize,
                notes: list[str]) -> tuple[set[int], dict[int, str]]:
    """The layers that may run with quantized activations, and those of them kept float (a Conv
    on a graph input, `layers.float_on_input`) with the reason; `notes` says why others cannot."""
    wants_static = opts.activations != "none"
    # int4 weights with 8-bit activations (W4A8) only when asked for by name: onnxruntime's CPU has
    # no kernel for the pair (the layer runs in float behind both dequantizations), so it is a
    # format for accelerators that have one, not a speed-up here.
    w4a8 = opts.weights == "int4" and opts.activations in ("int8", "uint8")
    static_kind = opts.weights in ("int8", "uint8") or w4a8
    candidates = {i for i, lay in layers.items() if block_for(lay, opts) == 0} if static_kind else set()
    if wants_static and not static_kind:
        notes.append(f"weights={opts.weights}: onnxruntime has no integer conv/gemm kernel for these weights, "
                     "so activations stay float (weight-only; activations=int8 or uint8 asks for W4A8)")
    elif w4a8:
        notes.append("W4A8: int4 weights with static 8-bit activations, as asked; onnxruntime's CPU runs "
                     "these layers in float behind the dequantizations (a format for accelerators with W4A8 kernels)")
    elif wants_static and len(candidates) < len(layers):
        notes.append("blocked weights are weight-only (activations stay float for those layers)")
    if wants_static and static_kind and opts.activation_dtype == "int8" and opts.weights == "uint8":
        notes.append("int8 activations with uint8 weights: onnxruntime has no fused kernel for this pair "
                     "(the QDQ graph stays correct but runs in float); prefer uint8 activations")
    if wants_static and candidates and data is None:
        notes.append("no calibration data: activations left in float, weights quantized (weight-only); "
                     "pass data to quantize activations")
        candidates = set()
    forced: dict[int, str] = {}
    for idx in sorted(candidates):
        why = float_on_input(ix, layers[idx])
        if why:
            forced[idx] = why
    return candidates, forced


# Observers calibrated inside a `shared_calibration()` scope, by what determines them: the bytes of
# the model make_plan was given, the data object, the method, the sample cap and the batch size.
# Plans of one model differ only by exact rewrites (MatMul + bias as Gemm, zero biases, an opset
# upgrade) that name every tensor they add afresh, so a tensor of the same name holds the same values.
_SHARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("quantize_shared_calibration", default=None)


@contextlib.contextmanager
def shared_calibration() -> Iterator[None]:
    """Within this scope (one quantize run and the plans it makes again: the latency gate's),
    a calibration whose tensors were all observed before on the same model and data reuses those
    observers instead of streaming the data again, and so do GPTQ's input second moments
    (`_moments`) and the range search's choices (`_search`). Nested scopes share the outer one."""
    if _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def _fingerprint(model: onnx.ModelProto) -> str | None:
    if _SHARED.get() is None:
        return None
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def _observe(model: onnx.ModelProto, source: str | None, data: Dataset, tensors: list[str], opts: Quantize,
             batch_size: int | None, feature_axis) -> tuple[dict, bool]:
    """calibration.calibrate, or the observers of an earlier calibration in the scope, of the same
    source model and data, that observed every tensor asked for now (True: reused)."""
    shared = _SHARED.get()
    if shared is None or source is None:
        return calibration.calibrate(model, data, tensors, calibration.observed(opts.calibration), batch_size=batch_size,
                                     max_samples=opts.max_samples, threads=opts.threads,
                                     feature_axis=feature_axis), False
    key = (source, id(data), opts.calibration, opts.max_samples, batch_size)
    asked, observers = shared.get(key, (frozenset(), {}))
    if key in shared and set(tensors) <= asked:
        return {t: o for t, o in observers.items() if t in tensors}, True
    observers = calibration.calibrate(model, data, tensors, calibration.observed(opts.calibration), batch_size=batch_size,
                                      max_samples=opts.max_samples, threads=opts.threads, feature_axis=feature_axis)
    shared[key] = (frozenset(tensors), observers)
    return observers, False


def _moments(source: str | None, data: Dataset | None, threads: int):
    """GPTQ's input statistics: `intermediates.second_moments` with each block of rows multiplied
    in float32 (half the arithmetic; `gptq` damps the moment by a share of its mean diagonal, far
    above the product's rounding) and the pass's onnxruntime threads; within a `shared_calibration`
    scope, one that reuses the second moments an earlier plan of the same source model and data
    computed, when they cover every tensor asked for (the latency gate's plan asks for those of a
    subset of the layers)."""
    compute = functools.partial(second_moments, product=np.float32, threads=threads)
    shared = _SHARED.get()
    if shared is None or source is None:
        return compute
    key = ("moments", source, id(data))

    def moments(model: onnx.ModelProto, data: Dataset | None, requests: set[tuple[str, int]]):
        asked, grams = shared.get(key, (frozenset(), {}))
        if key in shared and requests <= asked:
            return {r: grams[r] for r in requests if r in grams}
        grams = compute(model, data, requests)
        shared[key] = (frozenset(requests), grams)
        return grams
    return moments


def _search(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, Layer], weights: dict[int, TensorQuant],
            biases: dict[int, TensorQuant], pl: Placement, ranges: Mapping[str, tuple[float, float]], data: Dataset,
            opts: Quantize, batch_size: int | None, notes: list[str], source: str | None
            ) -> Mapping[str, tuple[float, float]]:
    """`ranges` with the output-error search's choices (`search.search_ranges`). Within a
    `shared_calibration` scope the first plan's choices are reused: the plans made again there
    (the latency gate's) keep a subset of its layers quantized, and are not searched again."""
    shared = _SHARED.get()
    key = ("search", source, id(data), opts.max_samples, opts.sensitivity_samples)
    reused = shared is not None and source is not None and key in shared
    if reused:
        chosen = shared[key]
    else:
        try:
            chosen = search.search_ranges(model, ix, layers, weights, biases, pl, data, opts, batch_size)
        except GraphOptError as exc:  # the probe model does not load or run (e.g. a custom op onnxruntime lacks)
            notes.append(f"range search not run ({exc}); the observed min/max ranges are kept")
            return ranges
        finally:
            release_memory()
        if shared is not None and source is not None:
            shared[key] = chosen
    n = sum(q.scheme != "shared" for q in pl.acts.values())
    how = "the first plan's, reused" if reused else "one streaming pass"
    notes.append(f"ranges by output-error search ({how} "
                 f"over {min(len(data), opts.max_samples, opts.sensitivity_samples)} samples): {len(chosen)} of {n} "
                 "activation ranges clipped below their observed min/max, where the error of the layers reading "
                 "them was least (search.ALPHAS)")
    return search.Searched(ranges, {t: r for t, r in chosen.items() if t in ranges})


def _chain_wanted(ix: GraphIndex, layers: dict[int, Layer], data: Dataset | None, opts: Quantize,
                  notes: list[str]) -> bool:
    """Whether GPTQ's layers are chained (`_chain`): ``chain`` is not off, some layer was solved
    against the data, and with ``chain=auto`` the model has no attention (`has_attention`)."""
    if not opts.chain_stages() or data is None or not any(lay.hessian is not None for lay in layers.values()):
        return False
    if opts.chain == "auto" and has_attention(ix):
        notes.append("chain=auto: GPTQ not chained on a transformer (attention found); chain=N chains it")
        return False
    return True


def _chain(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, Layer], decisions: list[NodeDecision],
           opset: int, candidates: set[int], ranges: Mapping[str, tuple[float, float]], forced: dict[int, str],
           unasked: frozenset[str], quantized: dict, data: Dataset, opts: Quantize, notes: list[str],
           source: str | None) -> bool:
    """Chained GPTQ (`chain.rechain`) on the plan placed so far: each stage's model is this plan
    applied with the codes of the moment. Within a `shared_calibration` scope the first plan's
    chained statistics are reused by the plans made again there (the latency gate's keep a subset
    of its layers quantized). True when any layer was re-solved."""
    shared = _SHARED.get()
    key = ("chain", source, id(data), len(data), opts.chain_stages())
    if shared is not None and source is not None and key in shared:
        solved = shared[key]
        hit = {i for i, lay in layers.items() if lay.hessian is not None and lay.label in solved}
        for i in hit:
            layers[i].hessian, layers[i].aim = solved[layers[i].label]
            quantized.pop((i, True), None)
            quantized.pop((i, False), None)
        notes.append(f"chain: {len(hit)} GPTQ layers rounded against the first plan's chained inputs, reused")
        return bool(hit)

    def build() -> chain.StageModel:
        pl = place(ix, layers, candidates, ranges, opts, forced, unasked)
        weights, biases = weights_and_biases(layers, pl, opts, quantized)
        trial = QuantPlan(opset=opset, nodes=list(decisions), notes=[])
        _record(trial, ix, layers, pl, forced, {}, [*weights.values(), *biases.values(), *pl.acts.values()], biases)
        acts = {i: pl.acts.get(layers[i].x) if i in pl.static else None for i in layers}
        return apply_plan(model, trial, int4_format=opts.int4_format), acts

    def forget(ids: set[int]) -> None:
        for i in ids:
            quantized.pop((i, True), None)
            quantized.pop((i, False), None)

    placed = set(place(ix, layers, candidates, ranges, opts, forced, unasked).decisions)  # not the layers kept float
    try:
        done = chain.rechain(model, ix, layers, data, opts.chain_stages(), opts, build, forget, notes, only=placed)
    except GraphOptError as exc:  # a stage model does not load or run
        notes.append(f"chain not run ({exc}); GPTQ kept its unchained codes")
        return False
    finally:
        release_memory()
    if shared is not None and source is not None:
        shared[key] = {layers[i].label: (layers[i].hessian, layers[i].aim) for i in done}
    return bool(done)


def _calibrate(model: onnx.ModelProto, ix: GraphIndex, layers: dict[int, Layer], candidates: set[int],
               forced: dict[int, str], data: Dataset, opts: Quantize, batch_size: int | None, notes: list[str],
               source: str | None = None) -> tuple[calibration.Ranges, frozenset[str], bool]:
    """The calibrated ranges, the candidate tensors left out of calibration, and False when the
    calibration failed (then every layer is weight-only, with a note)."""
    # Calibrate only what the placement can ask for: a dry run on stand-in ranges, where
    # every candidate tensor is calibrated and every Concat takes one scale, asks for a
    # superset of what the real placement asks (often a small share of the candidates).
    tensors = calibration_tensors(ix, layers, candidates)
    dry = calibration._Asking(set(tensors), lambda t: (-1.0, 1.0))
    place(ix, layers, candidates, dry, opts, forced)
    unasked = frozenset(tensors) - dry.asked.keys()
    tensors = [t for t in tensors if t in dry.asked]
    ok, reused = True, False
    try:
        observers, reused = _observe(model, source, data, tensors, opts, batch_size, calibration._feature_axes(ix))
    except GraphOptError as exc:
        notes.append(f"calibration failed, activations left in float (weight-only): {exc}")
        observers, ok = {}, False
    release_memory()
    ranges = calibration.Ranges(observers, opts)
    n = min(len(data), opts.max_samples)
    how = "the first plan's streaming pass, reused" if reused else "one streaming pass"
    notes.append(f"activations {opts.activation_dtype} per tensor, asymmetric, ranges by "
                 f"{calibration.observed(opts.calibration)} "
                 f"over {n} samples ({len(ranges)} tensors observed in {how}; "
                 f"{len(unasked)} other candidate tensors skipped: no placement could use them)")
    return ranges, unasked, ok


def _record(plan: QuantPlan, ix: GraphIndex, layers: dict[int, Layer], pl: Placement, forced: dict[int, str],
            sens: dict[int, dict[str, float]], tensors: list[TensorQuant], biases: dict[int, TensorQuant]) -> None:
    """Write the placement's decisions (the forced ones as float, with their reason and SNR), the
    quantized tensors, and why each bias of a layer with a quantized input stayed float."""
    decisions = plan.nodes
    for idx in sorted(set(pl.decisions) | set(forced)):
        if idx in forced:
            decisions.append(NodeDecision(ix.labels[idx], ix.nodes[idx].op_type, "float", forced[idx],
                                          sensitivity=sens.get(idx)))
        else:
            d = pl.decisions[idx]
            if idx in biases:
                d.bias = biases[idx].tensor
            decisions.append(d)
    for tq in tensors:
        plan.add(tq)
    for idx, lay in layers.items():
        if idx in forced or idx not in pl.static or lay.b is None or idx in biases:
            continue
        reason = lay.bias_float or "bias kept float"
        d = pl.decisions.get(idx)
        if d is not None:
            d.reason = (d.reason + "; " if d.reason else "") + f"bias float: {reason}"


def _upgrade_opset(model: onnx.ModelProto, target: int) -> tuple[onnx.ModelProto, str] | str:
    """The model at opset `target` and how it got there, or why it cannot."""
    current = opset_of(model)
    ops = {n.op_type for n in all_nodes(model.graph) if n.domain in ("", "ai.onnx")}
    unchanged = True
    for op in ops:
        try:
            unchanged &= onnx.defs.get_schema(op, target).since_version <= current
        except Exception:
            unchanged = False
    if unchanged:
        out = copy_model(model)
        for imp in out.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = target
        how = "opset import bumped: no op of the model changed between the two versions"
    else:
        try:
            out = onnx.version_converter.convert_version(model, target)
            check_model(out, full=False)  # a model whose weights stay on disk is checked without them
        except Exception as exc:
            text = first_line(exc, 200)
            return f"cannot upgrade opset {current} → {target} (needed by weights): {text}"
        how = "onnx.version_converter"
    try:
        min_ir = helper.find_min_ir_version_for(list(out.opset_import), ignore_unknown=True)
    except Exception:
        min_ir = out.ir_version
    out.ir_version = max(out.ir_version, int(min_ir))
    if how == "onnx.version_converter":
        try:
            make_session(out)
        except GraphOptError as exc:
            return f"opset {current} → {target} by onnx.version_converter gives a model onnxruntime refuses: {exc}"
    return out, how
