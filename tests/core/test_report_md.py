"""The Markdown review summary of an optimize run (`--report-md`)."""

import base64

from builders import small_cnn

from graph_opt.data import random_dataset
from graph_opt.pipeline import Pipeline
from graph_opt.registry import parse_spec
from graph_opt.report import pipeline_markdown


def _result(tolerances):
    model = small_cnn(channels=4)
    data = random_dataset(model, 8)
    passes = [parse_spec(s) for s in ("fold_batchnorm", "factorize_conv:rank=2,latency_gate=false", "cleanup")]
    return Pipeline(passes, verify_data=data, tolerances=tolerances, latency=False).run(model)


def test_summary_has_steps_tolerances_and_grouped_skips():
    result = _result({"cosine": 0.999, "snr_db": 10.0})
    text = pipeline_markdown(result, model="m.onnx", exit_status=0)
    assert text.startswith("## graph-opt: `m.onnx` — passed (exit 0)")
    assert "| step | params |" in text and "| + fold_batchnorm |" in text
    assert "- `cosine` >= 0.999:" in text and "- `snr_db` >= 10:" in text
    rolled = [s for s in result.steps if not s.accepted]
    assert rolled and f"**{rolled[0].spec}** rolled back" in text  # rank 2 breaks cosine 0.999
    skipped = next(s for s in result.steps if s.report and s.report.skipped)
    assert "<summary>Skipped, by reason</summary>" in text and skipped.report.skipped[0].reason in text


def test_broken_tolerance_and_embedded_plot():
    result = _result({"cosine": 2.0})  # unreachable: every step rolls back, the original breaks it too
    png = b"\x89PNG\r\n\x1a\nfake"
    text = pipeline_markdown(result, model="m.onnx", exit_status=1, plot_png=png)
    assert "FAILED (exit 1)" in text and "- `cosine` >= 2: 1, **broken**" in text
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in text and "http" not in text
