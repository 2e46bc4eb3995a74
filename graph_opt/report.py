"""Human-readable tables for pipeline results, parity reports and model statistics."""

from __future__ import annotations

import math
from typing import Any

from graph_opt.pipeline import PipelineResult, StepRecord
from graph_opt.stats import ModelStats, largest_layers
from graph_opt.verify import TOLERANCE_METRICS, ParityReport, check_tolerances


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _fmt(v: float | None, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def pipeline_table(result: PipelineResult) -> str:
    base = result.baseline.stats
    headers = ["step", "params", "size", "MACs", "latency", "cosine", "SNR dB", "top-1 agr", "accuracy", "time", "status"]
    rows = []
    for rec in [result.baseline, *result.steps]:
        rows.append(_step_row(rec, base, rec is result.baseline))
    text = table(headers, rows)
    notes = []
    for rec in result.steps:
        if not rec.accepted:
            notes.append(f"- {rec.name}: rolled back ({rec.reason})")
        if rec.report and rec.report.skipped:
            reasons: dict[str, int] = {}
            for s in rec.report.skipped:
                reasons[s.reason] = reasons.get(s.reason, 0) + 1
            summary = "; ".join(f"{r} (x{c})" if c > 1 else r for r, c in reasons.items())
            notes.append(f"- {rec.name}: skipped {len(rec.report.skipped)}: {summary}")
    if result.stopped:
        notes.append(f"- stopped: {result.stopped}")
    return text + ("\n" + "\n".join(notes) if notes else "")


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    return f" ({value / base:.2f}x)"


def _step_row(rec: StepRecord, base: ModelStats, is_base: bool) -> list[str]:
    st = rec.stats
    par = rec.parity
    if is_base:
        status = "reference"
    elif not rec.accepted:
        status = "rolled back"
    elif rec.modified:
        status = f"{len(rec.report.rewritten)} rewritten" if rec.report else "modified"
    else:
        status = "no change"
    lat = f"{st.latency_ms:.3f} ms" if st.latency_ms is not None else "-"
    acc = "-"
    if par is not None and par.accuracy_candidate is not None:
        acc = f"{100 * par.accuracy_candidate:.2f}%"
    return [
        rec.name if is_base else f"+ {rec.spec}",
        human_count(st.params) + ("" if is_base else _ratio(st.params, base.params)),
        human_bytes(st.file_bytes) + ("" if is_base else _ratio(st.file_bytes, base.file_bytes)),
        human_count(st.macs) + ("" if is_base else _ratio(st.macs, base.macs)),
        lat + ("" if is_base else _ratio(st.latency_ms, base.latency_ms)),
        _fmt(par.cosine if par else None, ".6f"),
        _fmt(par.snr_db if par else None, ".1f"),
        _fmt(par.top1 if par else None, ".4f"),
        acc,
        "-" if is_base else f"{rec.seconds:.2f}s",
        status,
    ]


def parity_table(report: ParityReport) -> str:
    headers = ["output", "shape", "max abs", "rel err", "cosine", "SNR dB", "top-1", "top-5", "KD loss", "relation"]
    rows = [[o.name, "x".join(map(str, o.shape)), _fmt(o.max_abs, ".3g"), _fmt(o.rel_error, ".3g"),
             _fmt(o.cosine, ".6f"), _fmt(o.snr_db, ".1f"), _fmt(o.top1, ".4f"), _fmt(o.top5, ".4f"),
             _fmt(o.kd_loss, ".3g"), _fmt(o.relation, ".3g")] for o in report.outputs]
    lines = [f"{report.samples} samples from {report.data_source}", table(headers, rows)]
    if report.accuracy_reference is not None:
        lines.append(f"accuracy: original {100 * report.accuracy_reference:.2f}%, "
                     f"candidate {100 * report.accuracy_candidate:.2f}%")
    for name, value in report.features.items():
        lines.append(f"feature distance {name}: {value:.6g}")
    if report.violations:
        lines.append("FAILED: " + "; ".join(report.violations))
    return "\n".join(lines)


def layers_table(layers: list) -> str:
    rows = [[l.tensor, l.producer, _fmt(l.snr_db, ".1f"), _fmt(l.cosine, ".6f"), _fmt(l.rel_error, ".3g")] for l in layers]
    return table(["tensor", "producer", "SNR dB", "cosine", "rel err"], rows)


def _layer_macs_text(layer) -> str:
    if layer.macs is not None:
        return human_count(layer.macs)
    if layer.macs_symbolic is not None:
        return symbolic_text(layer.macs_symbolic)
    return "unknown"


def symbolic_text(formula: str) -> str:
    """``8192*seq + 64*seq^2`` → ``8.19k·seq + 64·seq^2`` (coefficients in human units)."""
    terms = []
    for term in formula.split(" + "):
        head, _, rest = term.partition("*")
        terms.append(f"{human_count(int(head))}·{rest}" if head.isdigit() and rest else
                     human_count(int(head)) if head.isdigit() else term)
        terms[-1] = terms[-1].replace("*", "·")
    return " + ".join(terms)


def stats_text(stats: ModelStats, top: int = 10) -> str:
    if stats.macs is not None:
        macs = human_count(stats.macs)
    else:
        parts = [human_count(stats.macs_known)] if stats.macs_known else []
        if stats.macs_symbolic:
            parts.append(symbolic_text(stats.macs_symbolic))
        macs = " + ".join(parts) if parts else "unknown"
        if stats.macs_unknown:
            macs += f" + unknown ({stats.macs_unknown} layer{'s' if stats.macs_unknown > 1 else ''})"
    lines = [
        f"params: {stats.params:,} ({human_count(stats.params)})",
        f"weights: {human_bytes(stats.weight_bytes)}   file: {human_bytes(stats.file_bytes)}",
        f"MACs (batch 1): {macs}" + (f"   {stats.note}" if stats.note else ""),
    ]
    if stats.hint:
        lines.append(f"dynamic dimensions unbound: complete the count with {stats.hint}")
    if stats.latency_ms is not None:
        lines.append(f"onnxruntime CPU latency: {stats.latency_ms:.3f} ms (median)")
    elif stats.latency_note:
        lines.append(stats.latency_note)
    lines.append("ops: " + ", ".join(f"{k} {v}" for k, v in stats.ops.items()))
    layers = largest_layers(stats, top)
    if layers:
        total = stats.macs
        rows = [[l.name, l.op, _layer_macs_text(l),
                 f"{100 * l.macs / total:.1f}%" if total and l.macs is not None else "-", human_count(l.params)]
                for l in layers]
        lines.append("largest layers:")
        lines.append(table(["layer", "op", "MACs", "share", "params"], rows))
    return "\n".join(lines)


def jsonable(obj: Any) -> Any:
    """Replace non-finite floats by strings so the JSON is standard."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    return obj


def pipeline_markdown(result: PipelineResult, *, model: str, exit_status: int, plot_png: bytes | None = None,
                      plot_note: str = "") -> str:
    """A review summary of one optimize run: the step table, each tolerance met or broken with the
    exit status, what every pass skipped grouped by reason, and (when given) the fidelity-against-size
    plot embedded as a data URI, so the file stands alone when posted on a change."""
    verdict = "passed" if result.passed and exit_status == 0 else "FAILED"
    lines = [f"## graph-opt: `{model}` — {verdict} (exit {exit_status})", ""]
    base = result.baseline.stats
    headers = ["step", "params", "size", "MACs", "latency", "cosine", "SNR dB", "top-1 agr", "accuracy", "time", "status"]
    rows = [_step_row(rec, base, rec is result.baseline) for rec in [result.baseline, *result.steps]]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    lines.append("")
    final = result.final_parity
    which = "final model"
    if result.stopped and result.steps and result.steps[-1].parity is not None:
        final, which = result.steps[-1].parity, f"`{result.steps[-1].spec}`, which stopped the run"
    if result.tolerances:
        lines += [f"**Tolerances** ({which} against the original, on the verification data):", ""]
        for metric, bound in result.tolerances.items():
            value = final.metric(metric) if final is not None else None
            kind = ">=" if TOLERANCE_METRICS[metric] == "min" else "<="
            met = bool(final is not None and not check_tolerances(final, {metric: bound}))
            shown = "not measured" if value is None else f"{value:.6g}"
            lines.append(f"- `{metric}` {kind} {bound:g}: {shown}, {'met' if met else '**broken**'}")
        lines.append("")
    for rec in result.steps:
        if not rec.accepted:
            lines.append(f"- **{rec.spec}** rolled back: {rec.reason}")
    if result.stopped:
        lines.append(f"- **stopped**: {result.stopped}")
    skips = [(rec, rec.report.skipped) for rec in result.steps if rec.report and rec.report.skipped]
    if skips:
        lines += ["", "<details><summary>Skipped, by reason</summary>", ""]
        for rec, skipped in skips:
            by_reason: dict[str, list[str]] = {}
            for s in skipped:
                by_reason.setdefault(s.reason, []).append(s.node)
            lines.append(f"**{rec.spec}**")
            lines.append("")
            for reason, nodes in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
                shown = ", ".join(f"`{n}`" for n in nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
                lines.append(f"- {reason} ({len(nodes)}): {shown}")
            lines.append("")
        lines.append("</details>")
    if plot_png is not None:
        import base64

        lines += ["", f"![fidelity against size](data:image/png;base64,{base64.b64encode(plot_png).decode()})"]
    elif plot_note:
        lines += ["", f"_{plot_note}_"]
    return "\n".join(lines).rstrip() + "\n"
