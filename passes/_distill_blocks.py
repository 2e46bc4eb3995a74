"""Block-local training for `distill` (``blocks=``): each block of the student learns to reproduce the
teacher's value at its end from the student's own values at its start, one block after the other.

Blocks: ``blocks=T1,T2,…`` names tensors that both graphs compute under those names, in graph order.
Block k is the run of student nodes after the producer of T(k−1) (the graph's start for k = 1) up to
and including the producer of Tk. Blocks are visited in order over every calibration batch, so a
block's inputs are the student's values with the blocks before it already trained: errors chain as
the deployed model sees them (as in `reconstruct`), and each problem is small and well posed.

Trained: a *row-wise* block, whose every node maps the feature vector at one position to one at the
same position, on its own: MatMul by a constant matrix, Gemm (``transA = 0``) by constants,
elementwise ops whose constant operand varies along the last axis at most, activations,
LayerNormalization over the last axis. A transformer layer's feed-forward block (dense → GELU →
dense → residual Add → LayerNorm) is one. Its inputs and the teacher's Tk flatten to rows
``[positions, features]``; positions the row mask drops (padding, `graph_opt.row_mask`) are left
out. Adam minimizes the relative MSE ``Σ‖b(x) − t‖² / Σ‖t‖²`` on random minibatches of rows for
``block_epochs`` passes over the rows, its step decaying from ``block_lr`` on a cosine; the rows of
the held-out batches are checked 8 times per block and pick the weights kept (the block's starting
weights when no step lowered their error). Any other block (attention mixes positions) is run, not
trained, and the report says why. What this stage does not fix, the whole-model stage that follows
may: `distill` keeps the result of either stage only when it lowers the held-out loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx

from graph_opt.pass_base import PassReport
from graph_opt.row_mask import RowMask

_ROWS = 1024  # rows per step: a few sentences' worth of real tokens
_CHECKS = 8   # held-out checks per block
_UNARY = {"Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Sqrt", "Neg", "Identity", "Dropout", "LeakyRelu",
          "HardSigmoid", "HardSwish", "Clip", "Cast"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow"}


@dataclass
class Block:
    """Nodes `indices` of the student (graph order) ending at the producer of `end`; `why_not` is None
    when the block is row-wise (trained), else the reason it is only run."""

    end: str
    indices: range
    inputs: list[str]
    why_not: str | None


def plan(tg, names: tuple[str, ...], error) -> list[Block]:
    """The blocks `names` cut the student `tg` (a `TorchGraph`) into; `error` is raised for a name the
    student does not compute or one out of graph order."""
    producer = {o: i for i, n in enumerate(tg.nodes) for o in n.output if o}
    blocks, start = [], 0
    for name in names:
        if name not in producer:
            raise error(f"block boundary {name!r} is not computed by the student")
        end = producer[name]
        if end < start:
            raise error(f"block boundary {name!r} comes before the previous one in graph order")
        indices = range(start, end + 1)
        made = {o for i in indices for o in tg.nodes[i].output}
        inputs = sorted({i for k in indices for i in tg.nodes[k].input
                         if i and i not in made and not _is_const(tg, i)})
        blocks.append(Block(name, indices, inputs, _not_rowwise(tg, indices)))
        start = end + 1
    return blocks


def _is_const(tg, name: str) -> bool:
    return name in tg.keys or name in tg.fixed


def _not_rowwise(tg, indices: range) -> str | None:
    """Why the nodes at `indices` do not act on each position's features alone, or None."""
    def const_rows(name: str) -> bool:  # a constant that varies along the last axis at most
        return _is_const(tg, name) and all(d == 1 for d in tuple(tg.value(name).shape)[:-1])

    for k in indices:
        n = tg.nodes[k]
        a = {x.name: x for x in n.attribute}
        ins = [i for i in n.input if i]
        label = f"{n.op_type} {n.name!r}"
        if n.op_type == "Constant" or n.op_type in _UNARY and all(const_rows(i) for i in ins[1:]):
            continue
        if n.op_type in _BINARY and all(not _is_const(tg, i) or const_rows(i) for i in ins):
            continue
        if n.op_type == "MatMul" and not _is_const(tg, ins[0]) and _is_const(tg, ins[1]) \
                and tg.value(ins[1]).dim() == 2:
            continue
        if n.op_type == "Gemm" and not _is_const(tg, ins[0]) and all(_is_const(tg, i) for i in ins[1:]) \
                and not (a.get("transA") and a["transA"].i) and (len(ins) < 3 or const_rows(ins[2])):
            continue
        if n.op_type == "LayerNormalization" and (a["axis"].i if "axis" in a else -1) == -1 \
                and all(const_rows(i) for i in ins[1:]):
            continue
        return f"{label} does not act on each position's features alone"
    return None


class BlockStage:
    """Chained block-local training over the calibration batches (see the module docstring)."""

    def __init__(self, tg, blocks: list[Block], teacher_rows: dict[str, list[np.ndarray]],
                 mask: RowMask | None, torch, device: str, *, epochs: float, lr: float, seed: int):
        self.tg, self.blocks, self.teacher_rows, self.mask = tg, blocks, teacher_rows, mask
        self.t, self.device, self.epochs, self.lr, self.seed = torch, device, epochs, lr, seed

    def keep(self, feed: dict[str, np.ndarray], value) -> np.ndarray | None:
        """Positions of `value` (features last) that count in the run of `feed`, or None for all."""
        return None if self.mask is None else self.mask.keep(feed, tuple(value.shape), -1)

    def rows(self, feed, value):
        flat = value.reshape(-1, value.shape[-1])
        keep = self.keep(feed, value)
        return flat if keep is None else flat[self.t.as_tensor(np.array(keep)).to(flat.device)]

    def run(self, feeds: list[dict[str, np.ndarray]], n_train: int, report: PassReport, deadline: float) -> None:
        torch = self.t
        later = self._needed_after()
        envs = [{k: torch.from_numpy(np.asarray(v)).to(self.device) for k, v in f.items()} for f in feeds]
        last = max((b for b, block in enumerate(self.blocks) if block.why_not is None), default=-1)
        for b, block in enumerate(self.blocks[:last + 1]):  # nothing after the last trained block needs to run
            label = f"block {b + 1} (ending at {block.end!r})"
            if block.why_not is not None:
                report.note(f"distill blocks: {label} run, not trained: {block.why_not}")
            elif time.monotonic() > deadline:
                report.note(f"distill blocks: {label} and the blocks after it not trained: max_minutes reached")
                return
            else:
                self._train(block, label, feeds, envs, n_train, report)
            if b == last:
                break
            with torch.no_grad():
                for env in envs:
                    self.tg.run(block.indices, env)
                    for name in [k for k in env if k not in later[b]]:
                        del env[name]
        for b, block in enumerate(self.blocks[last + 1:], start=last + 2):
            report.note(f"distill blocks: block {b} (ending at {block.end!r}) not trained: {block.why_not}")

    def _needed_after(self) -> list[set[str]]:
        """Per block, the tensors a node after it (or an output) reads: what the envs must keep."""
        out = []
        for block in self.blocks:
            rest = range(block.indices.stop, len(self.tg.nodes))
            out.append({i for k in rest for i in self.tg.nodes[k].input} | set(self.tg.outputs))
        return out

    def _train(self, block: Block, label: str, feeds, envs, n_train: int, report: PassReport) -> None:
        torch = self.t
        if not block.inputs:
            report.note(f"distill blocks: {label} run, not trained: it reads no tensor computed before it")
            return
        xs = {name: [] for name in block.inputs}
        for feed, env in zip(feeds, envs):
            for name in block.inputs:
                if env[name].shape[:-1] != env[block.inputs[0]].shape[:-1]:
                    report.note(f"distill blocks: {label} run, not trained: its inputs {block.inputs[0]!r} and "
                                f"{name!r} have different positions")
                    return
                xs[name].append(self.rows(feed, env[name]))
        target = [torch.from_numpy(t).to(self.device) for t in self.teacher_rows[block.end]]
        split = sum(len(t) for t in target[:n_train])
        x = {k: torch.cat(v) for k, v in xs.items()}
        y = torch.cat(target)
        train_x, held_x = {k: v[:split] for k, v in x.items()}, {k: v[split:] for k, v in x.items()}
        train_y, held_y = y[:split], y[split:]
        if not len(train_y) or not len(held_y):
            report.note(f"distill blocks: {label} run, not trained: no rows to train or check on")
            return
        params = self._params(block)
        if not params:
            report.note(f"distill blocks: {label} run, not trained: it has no trainable weights")
            return

        def error(xb, yb):
            env = dict(xb)
            self.tg.run(block.indices, env)
            got = env[block.end].reshape(-1, yb.shape[-1])
            return torch.sum((got - yb) ** 2) / torch.clamp(torch.sum(yb ** 2), min=1e-12)

        def held() -> float:
            with torch.no_grad():
                return float(error(held_x, held_y))

        start = best = held()
        best_state = [p.detach().clone() for p in params]
        n = len(train_y)
        steps = max(1, math.ceil(self.epochs * n / _ROWS))
        optim = torch.optim.Adam(params, lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        gen = torch.Generator().manual_seed(self.seed)
        every = max(1, steps // _CHECKS)
        for step in range(1, steps + 1):
            idx = torch.randint(0, n, (min(_ROWS, n),), generator=gen).to(self.device)
            loss = error({k: v[idx] for k, v in train_x.items()}, train_y[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            if step % every == 0 or step == steps:
                now = held()
                if now < best:
                    best, best_state = now, [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
        report.note(f"distill blocks: {label} trained on {n} rows, {steps} steps, held-out relative error "
                    f"{start:.4g} → {best:.4g}")

    def _params(self, block: Block) -> list:
        keys = sorted({self.tg.keys[i] for k in block.indices for i in self.tg.nodes[k].input if i in self.tg.keys})
        return [self.tg.params[k] for k in keys]


def teacher_rows(teacher: onnx.ModelProto, blocks: list[Block], feeds: list[dict[str, np.ndarray]],
                 stage: BlockStage) -> dict[str, list[np.ndarray]]:
    """The teacher's value at the end of every trained block, as the rows that count, per batch."""
    from graph_opt.intermediates import with_outputs
    from graph_opt.runtime import make_session

    names = [b.end for b in blocks if b.why_not is None]
    if not names:
        return {}
    cap = with_outputs(teacher, names, " (distill blocks)")
    session = make_session(cap.model, weights=cap.weights)
    del cap
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            flat = value.reshape(-1, value.shape[-1])
            keep = stage.keep(feed, value)
            out[name].append(np.ascontiguousarray(flat if keep is None else flat[keep]))
    return out
