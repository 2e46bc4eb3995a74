"""distill: train the student's weights against the original model (the teacher), in place.

Before / after: the same graph, node for node and name for name; only the values of the layers'
float weights change (Conv/Gemm/MatMul weights and biases, normalization scales, bias Adds). Any
pass order composes: ``prune_channels → distill → quantize → reconstruct``.

How: the student graph becomes a torch module (`passes._torch.TorchGraph`, checked against
onnxruntime on a calibration batch before anything trains); the teacher (``ctx.original``) runs
under onnxruntime once over the calibration data for its outputs and hint tensors. Adam then
minimizes, per batch (unlabeled unless the data carries labels):

- outputs, ``loss=kd``: ``α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE(s, y)`` on logits
  (2-D outputs of two or more classes; ``α`` 1 without labels, 0.9 with them), relative MSE
  ``‖s − t‖² / ‖t‖²`` on every other output; ``loss=mse``: relative MSE everywhere. An output that
  already holds probabilities (every teacher row non-negative and summing to 1: a softmax inside
  the graph) is taken through ``log`` first (clamped at 1e-30), which gives back its logits up to
  a per-row constant that softmax ignores: the soft labels at ``T`` are then the softmax's own,
  where the softmax of the probabilities would be nearly uniform;
- ``hint=TEACHER=STUDENT`` (FitNets): ``½‖A_s − A_t‖²`` per element between intermediate tensors
  (one name when both graphs call it the same), weighted by ``beta``; ``attention`` > 0 adds
  attention transfer on 4-D hints: ``‖Q_s/‖Q_s‖ − Q_t/‖Q_t‖‖²`` with ``Q = Σ_c A_c²``;
- ``relation`` > 0 (RKD distance): the batch's pairwise output distances, each normalized by their
  mean, matched by smooth-L1.

``blocks=T1,T2,…`` first trains block by block (`passes._distill_blocks`): the student's nodes are
cut at those tensors (computed by both graphs under the same names) and each block whose nodes act
on every position's features alone (a transformer's feed-forward block) learns, on the student's
own inputs with the blocks before it already trained, to reproduce the teacher's tensor at its end
(relative MSE over the positions ``row_mask`` keeps; ``block_epochs`` passes over those rows, Adam
from ``block_lr``). The whole-model training above then starts from the better (on the held-out
batches) of the block-trained and the input weights; ``steps=0`` stops after the block stage.

A share (``holdout``) of the calibration batches is held out; every ``eval_every`` steps the same
loss is measured there, the best weights are kept, and training stops after ``patience`` evaluations
without improvement, at ``steps``, or at ``max_minutes``. CPU by default, CUDA when present
(``device``). The result is never worse on the held-out batches than the input: if no step lowered
their loss the model is returned unchanged, with the reason.

Refused (an error naming the cause, before any training): torch not installed (the optional
``graph-opt[train]`` extra); an op, attribute or subgraph the conversion does not implement; a
conversion that does not reproduce onnxruntime's outputs; a hint tensor neither graph computes.
Skipped with the reason: no teacher; no calibration data; weights kept on disk (over 2 GB).
Lossy by design: the student moves towards the teacher on the calibration distribution only.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from graph_opt.data import Dataset, paired_batch_size
from graph_opt.errors import GraphOptError
from graph_opt.external_data import has_disk_weights
from graph_opt.model_io import copy_model
from graph_opt.pass_base import Pass, PassContext, PassReport
from graph_opt.passes._graph import GraphIndex
from graph_opt.progress import bar
from graph_opt.row_mask import AUTO, resolve as resolve_row_mask
from graph_opt.runtime import make_session

log = logging.getLogger(__name__)

# Probabilities are clamped here before their log (a softmax's tail underflows to 0 in float32).
PROBABILITY_FLOOR = 1e-30


class MissingExtraError(GraphOptError):
    """An optional dependency a pass needs is not installed."""


@dataclass(frozen=True, kw_only=True)
class Distill(Pass):
    """Train the student's weights on the teacher's outputs and hints (torch extra; same graph out)."""

    name: ClassVar[str] = "distill"
    needs_data: ClassVar[bool] = True

    loss: Literal["kd", "mse"] = "kd"
    T: float = 4.0
    alpha: float | None = None
    hint: tuple[str, ...] = ()
    beta: float = 1.0
    attention: float = 0.0
    relation: float = 0.0
    steps: int = 500
    lr: float = 1e-4
    batch_size: int = 16
    holdout: float = 0.25
    eval_every: int = 25
    patience: int = 4
    max_minutes: float = 15.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0
    blocks: tuple[str, ...] = ()
    block_epochs: float = 4.0
    block_lr: float = 1e-3
    row_mask: str | None = AUTO

    def __post_init__(self) -> None:
        for opt in ("T", "lr", "max_minutes", "block_epochs", "block_lr"):
            if not getattr(self, opt) > 0:
                raise ValueError(f"{opt} must be > 0, got {getattr(self, opt)}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        for opt in ("steps", "batch_size", "eval_every", "patience"):
            if getattr(self, opt) < (0 if opt == "steps" and self.blocks else 1):
                raise ValueError(f"{opt} must be >= 1{' (0 only with blocks=)' if opt == 'steps' else ''}, "
                                 f"got {getattr(self, opt)}")
        for opt in ("beta", "attention", "relation", "threads"):
            if getattr(self, opt) < 0:
                raise ValueError(f"{opt} must be >= 0, got {getattr(self, opt)}")

    def preflight(self) -> None:
        _torch()

    def run(self, model: onnx.ModelProto, report: PassReport, ctx: PassContext) -> onnx.ModelProto:
        if ctx.original is None:
            report.skip("model", "no teacher (ctx.original is None): nothing to distill from")
            return model
        if ctx.data is None or len(ctx.data) < 2:
            report.skip("model", "no calibration data (at least 2 samples): nothing to train on")
            return model
        if has_disk_weights(model) or has_disk_weights(ctx.original):
            report.skip("model", "weights kept on disk (over 2 GB): distill trains every weight in memory")
            return model
        torch = _torch()
        from graph_opt.passes._torch import TorchGraph, UntrainableError

        if ctx.data.seeded_random:
            report.note("distill: no calibration data was given, so the student trains on seeded random inputs")
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            return self._train(model, report, ctx, torch, TorchGraph, UntrainableError)
        finally:
            torch.set_num_threads(threads)  # a process-wide setting: give it back

    def _blocks(self, student, batches, n_train, report, ctx, torch, device, deadline, error, held_loss,
                start_loss) -> float:
        """The block-local stage; returns the held-out loss of the whole model after it."""
        from graph_opt.passes._distill_blocks import BlockStage, plan, teacher_rows

        mask, why = resolve_row_mask(self.row_mask, ctx.original, ctx.data)
        for note in (why, mask and mask.describe()):
            if note:
                report.note(f"distill blocks: {note}")
        blocks = plan(student, self.blocks, error)
        feeds = [b.feed for b in batches]
        stage = BlockStage(student, blocks, {}, mask, torch, device, epochs=self.block_epochs, lr=self.block_lr,
                           seed=ctx.seed)
        stage.teacher_rows = teacher_rows(ctx.original, blocks, feeds, stage)
        stage.run(feeds, n_train, report, deadline)
        after = held_loss()
        report.note(f"distill blocks: whole-model held-out loss {start_loss:.5g} → {after:.5g}"
                    + ("" if after < start_loss else " (not lower: the input weights are kept)"))
        return after

    def _train(self, model, report, ctx, torch, TorchGraph, UntrainableError) -> onnx.ModelProto:
        pairs = [tuple(h.split("=", 1)) if "=" in h else (h, h) for h in self.hint]
        torch.manual_seed(ctx.seed)
        device = "cuda" if self.device == "auto" and torch.cuda.is_available() else (
            "cpu" if self.device == "auto" else self.device)
        if device == "cuda" and not torch.cuda.is_available():
            raise UntrainableError("device=cuda, but torch sees no CUDA device")

        student = TorchGraph(model, keep=tuple(s for _, s in pairs))
        missing = [s for _, s in pairs if not any(s in n.output for n in model.graph.node)]
        if missing:
            raise UntrainableError(f"hint tensor {missing[0]!r} is not computed by the student")
        batches = _teacher_batches(ctx.original, ctx.data, [t for t, _ in pairs],
                                   paired_batch_size(ctx.original, model, min(self.batch_size, len(ctx.data))))
        first = batches[0]  # the conversion must reproduce the student as onnxruntime runs it
        student.check(first.feed, make_session(model).run(student.outputs, first.feed))
        student.to(device)
        n_hold = max(1, int(round(len(batches) * self.holdout))) if len(batches) > 1 else 0
        train, held = (batches[:-n_hold], batches[-n_hold:]) if n_hold else (batches, batches)
        labels = ctx.data.labels is not None
        alpha = self.alpha if self.alpha is not None else (0.9 if labels else 1.0)
        probabilities = _probability_outputs(batches, student.outputs) if self.loss == "kd" else frozenset()
        if probabilities:
            report.note(f"distill: {', '.join(sorted(probabilities))} hold probabilities (teacher rows non-negative, "
                        "summing to 1): KD and cross-entropy on their logs")
        losses = _Losses(self, student.outputs, pairs, alpha, torch, device, probabilities)

        def held_loss() -> float:
            with torch.no_grad():
                return float(np.mean([losses(student, b).item() for b in held]))

        start_loss = best = held_loss()
        best_state = {k: v.detach().clone() for k, v in student.params.items()}
        deadline = time.monotonic() + 60.0 * self.max_minutes
        if self.blocks:
            best = self._blocks(student, batches, len(train), report, ctx, torch, device, deadline,
                                UntrainableError, held_loss, start_loss)
            if best < start_loss:
                best_state = {k: v.detach().clone() for k, v in student.params.items()}
            else:
                student.params.load_state_dict(best_state)
                best = start_loss
        best_step, stale, step = 0, 0, 0
        optim = torch.optim.Adam(student.params.parameters(), lr=self.lr)
        rng = np.random.default_rng(ctx.seed)
        stopped = "steps" if time.monotonic() <= deadline else "max_minutes"
        progress = bar(self.steps, desc="distill")
        try:
            while step < self.steps and time.monotonic() <= deadline:
                for i in rng.permutation(len(train)):
                    loss = losses(student, train[i])
                    optim.zero_grad()
                    loss.backward()
                    optim.step()
                    step += 1
                    progress.update(1)
                    if step % self.eval_every == 0 or step == self.steps:
                        now = held_loss()
                        progress.set_postfix(train=f"{loss.item():.4g}", held=f"{now:.4g}")
                        if now < best:
                            best, best_step, stale = now, step, 0
                            best_state = {k: v.detach().clone() for k, v in student.params.items()}
                        else:
                            stale += 1
                    if step >= self.steps or stale >= self.patience or time.monotonic() > deadline:
                        stopped = ("steps" if step >= self.steps else
                                   "early stop" if stale >= self.patience else "max_minutes")
                        break
                if stopped != "steps" or step >= self.steps:
                    break
        finally:
            progress.close()
        report.note(f"distill: {step} steps on {len(train)} batches ({stopped}), held-out loss "
                    f"{start_loss:.5g} → {best:.5g} (best at step {best_step}), device {device}")
        if not best < start_loss:
            report.skip("model", f"training did not lower the held-out loss ({start_loss:.5g}); weights kept")
            return model
        student.params.load_state_dict(best_state)
        return _write_back(model, student.state(), report)


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingExtraError("distill needs torch: pip install 'graph-opt[train]'") from None
    return torch


@dataclass
class _Batch:
    feed: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]   # teacher outputs and hint tensors
    labels: np.ndarray | None


def _teacher_batches(teacher: onnx.ModelProto, data: Dataset, hints: list[str], batch_size: int) -> list[_Batch]:
    """The calibration data in fixed batches, each with the teacher's outputs and hint tensors."""
    from graph_opt.intermediates import with_outputs

    cap = with_outputs(teacher, hints, " (distill hints)")
    session = make_session(cap.model, weights=cap.weights)
    del cap
    names = [o.name for o in session.get_outputs()]
    out, n = [], len(data)
    step = data.fixed or batch_size
    for start in range(0, n, step):  # each input cut on its own batch axis, labels alike
        stop = min(start + step, n)
        feed = data.slice(start, stop)
        labels = None if data.labels is None else np.asarray(data.labels[start:stop])
        out.append(_Batch(feed, dict(zip(names, session.run(names, feed))), labels))
    return out


class _Losses:
    """The training loss of one batch: outputs (KD or relative MSE), hints, attention, relations."""

    def __init__(self, opts: Distill, outputs: list[str], pairs: list[tuple[str, str]], alpha: float, torch, device,
                 probabilities: frozenset[str] = frozenset()):
        self.o, self.outputs, self.pairs, self.alpha, self.t, self.device = opts, outputs, pairs, alpha, torch, device
        self.probabilities = probabilities  # outputs matched on their logs (`_probability_outputs`)

    def __call__(self, student, batch: _Batch):
        torch, F = self.t, self.t.nn.functional
        feed = {k: torch.from_numpy(np.asarray(v)).to(self.device) for k, v in batch.feed.items()}
        got = student(**feed)
        total = 0.0
        for name in self.outputs:
            s = got[name]
            t = torch.from_numpy(batch.targets[name]).to(self.device)
            if not torch.is_floating_point(s):
                continue
            if self.o.loss == "kd" and s.dim() == 2 and s.shape[1] >= 2:
                if name in self.probabilities:
                    s, t = (torch.log(torch.clamp(v, min=PROBABILITY_FLOOR)) for v in (s, t))
                T = self.o.T
                kl = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
                total = total + self.alpha * T * T * kl
                if batch.labels is not None and self.alpha < 1.0:
                    y = torch.from_numpy(batch.labels.astype(np.int64)).to(self.device)
                    total = total + (1.0 - self.alpha) * F.cross_entropy(s, y)
            else:
                total = total + torch.sum((s - t) ** 2) / torch.clamp(torch.sum(t ** 2), min=1e-12)
            if self.o.relation > 0 and s.shape[0] > 2:
                total = total + self.o.relation * _rkd_distance(s, t, torch)
        for teacher_name, student_name in self.pairs:
            s = got[student_name]
            t = torch.from_numpy(batch.targets[teacher_name]).to(self.device)
            if s.shape != t.shape:
                raise GraphOptError(f"hint {teacher_name}={student_name}: shapes {tuple(t.shape)} and "
                                    f"{tuple(s.shape)} differ")
            total = total + self.o.beta * 0.5 * torch.mean((s - t) ** 2)
            if self.o.attention > 0 and s.dim() == 4:
                total = total + self.o.attention * _attention_transfer(s, t, torch)
        return total


def _probability_outputs(batches: list[_Batch], outputs: list[str]) -> frozenset[str]:
    """The 2-D outputs of two or more columns whose teacher rows, in every batch, are non-negative
    and sum to 1 (within 1e-3): probabilities, not logits."""
    def rows_are_probabilities(t) -> bool:
        return (t.ndim == 2 and t.shape[1] >= 2 and np.issubdtype(t.dtype, np.floating) and bool(np.all(t >= 0))
                and bool(np.all(np.abs(t.sum(1, dtype=np.float64) - 1.0) <= 1e-3)))
    return frozenset(name for name in outputs
                     if all(name in b.targets and rows_are_probabilities(np.asarray(b.targets[name])) for b in batches))


def _attention_transfer(s, t, torch):
    qs, qt = (x.pow(2).sum(1).flatten(1) for x in (s, t))
    qs = qs / torch.clamp(qs.norm(dim=1, keepdim=True), min=1e-12)
    qt = qt / torch.clamp(qt.norm(dim=1, keepdim=True), min=1e-12)
    return (qs - qt).pow(2).sum(1).mean()


def _rkd_distance(s, t, torch):
    def normalized(x):
        d = torch.cdist(x.flatten(1), x.flatten(1))
        return d / torch.clamp(d[d > 0].mean(), min=1e-12) if bool((d > 0).any()) else d
    return torch.nn.functional.smooth_l1_loss(normalized(s), normalized(t))


def _write_back(model: onnx.ModelProto, trained: dict[str, np.ndarray], report: PassReport) -> onnx.ModelProto:
    out = copy_model(model)
    ix = GraphIndex(out)
    for t in out.graph.initializer:
        if t.name not in trained:
            continue
        old = numpy_helper.to_array(t)
        new = trained[t.name].astype(old.dtype).reshape(old.shape)
        change = float(np.linalg.norm(new - old) / max(np.linalg.norm(old), 1e-30))
        if change == 0.0 or not math.isfinite(change):
            continue
        t.CopyFrom(numpy_helper.from_array(new, t.name))
        first = ix.nodes[ix.readers(t.name)[0][0]] if ix.readers(t.name) else None
        report.rewrite(first.name or first.op_type if first else t.name, weight=t.name, action="trained",
                       rel_change=change)
    return out
