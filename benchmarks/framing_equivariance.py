"""Measure canonical framing: equivariance of the lung box under the framing shifts, cost, fallbacks.

    PYTHONPATH=src python benchmarks/framing_equivariance.py --data ../shared/data [--sheets docs]

1. **equivariance**: every validation film of ``train_val_samples(root, "binary", 0.15, 0)`` (patients
   the localizer never saw) is located clean and under each shift of
   :data:`pneumo.evaluation.robustness.SHIFTS` that keeps the picture upright; the shifted box is
   mapped back to the clean film's coordinates and compared with the clean box (IoU). The lung box
   may reach past the frame where a crop cuts the lungs (the localizer learned where they end);
   ``iou_visible`` compares the two boxes cut to the part of the film still in the shifted frame,
   i.e. what the crop the model sees depends on, and ``ceiling_in_frame`` is the IoU that a box
   confined to the frame could reach at best; ``crop_iou`` compares the crops the model is shown
   (lung box + margin, clamped to each image), mapped to the clean film;
2. **agreement with the pseudo-labels** on the validation films the classical labeler accepts;
3. **cost per film** of ``Framer.apply`` on the 224 px films and on the full-resolution originals
   decoded as the Predictor decodes them (``read_image(path, draft_size=240)``);
4. **fallback rate** (``found=False``) on the 5,216 training films and on the non-X-ray set of
   ``benchmarks/ood_nonxray.py`` (per category);
5. **full resolution vs 224 px**: IoU of the boxes found on the 14 originals (drafted) and on their
   224 px copies in the dataset;
6. ``--sheets``: contact sheets of the boxes on 100 random validation films and the 14 originals.

Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pneumo.core.dataset import discover, train_val_samples
from pneumo.core.decode import read_image
from pneumo.core.errors import PneumoError
from pneumo.core.framing import Box, Framer, FramingConfig
from pneumo.evaluation.robustness import shift_image

log = logging.getLogger("framing_equivariance")
REPO = Path(__file__).resolve().parents[1]

#: Shifts as frames: (left, top, right, bottom) fractions cut (positive) or padded (negative), as
#: :mod:`pneumo.evaluation.robustness` makes them. The first six are the framing shifts.
FRAMES: dict[str, tuple[float, float, float, float]] = {
    "crop_top_bottom_12": (0.0, 0.12, 0.0, 0.12),
    "crop_top_bottom_20": (0.0, 0.20, 0.0, 0.20),
    "crop_sides_10": (0.10, 0.10, 0.10, 0.10),
    "crop_left_right_10": (0.10, 0.0, 0.10, 0.0),
    "pad_12": (-0.125, -0.125, -0.125, -0.125),
    "pad_top_bottom_15": (0.0, -0.15, 0.0, -0.15),
    "tight_with_text": (0.0, 0.12, 0.0, 0.12),
    "text": (0.0, 0.0, 0.0, 0.0),
    "blur": (0.0, 0.0, 0.0, 0.0),
    "low_resolution": (0.0, 0.0, 0.0, 0.0),
    "gamma": (0.0, 0.0, 0.0, 0.0),
    "contrast": (0.0, 0.0, 0.0, 0.0),
    "noise": (0.0, 0.0, 0.0, 0.0),
    "jpeg_q15": (0.0, 0.0, 0.0, 0.0),
}
FRAMING_SHIFTS = tuple(FRAMES)[:6]


def frame_pixels(frame: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """The shifted image's edges in the clean image's pixels, rounded exactly as the shifts round them."""
    left, top, right, bottom = frame
    if left < 0 or top < 0 or right < 0 or bottom < 0:  # robustness._pad: round(fraction * side) per side
        dx, dy = round(-left * width), round(-top * height)
        return -dx, -dy, width + dx, height + dy
    return round(left * width), round(top * height), width - round(right * width), height - round(bottom * height)


def to_clean(box: Box, window: tuple[int, int, int, int], width: int, height: int) -> Box:
    """A box found in the shifted image, in the clean image's normalized coordinates."""
    left, top, right, bottom = window
    sx, sy = (right - left) / width, (bottom - top) / height
    return Box(
        left / width + box.x0 * sx,
        top / height + box.y0 * sy,
        left / width + box.x1 * sx,
        top / height + box.y1 * sy,
        box.found,
    )


def _clip(box: Box, frame: Box) -> Box:
    """The part of ``box`` inside ``frame``."""
    return Box(max(box.x0, frame.x0), max(box.y0, frame.y0), min(box.x1, frame.x1), min(box.y1, frame.y1))


def _crop_of(box: Box, margin: float) -> Box:
    """What :meth:`Framer.crop_box` makes of a lung box: grown by the margin, clamped to the image."""
    if not box.found:
        return Box(0.0, 0.0, 1.0, 1.0, False)
    dx, dy = margin * box.width, margin * box.height
    return Box(max(0.0, box.x0 - dx), max(0.0, box.y0 - dy), min(1.0, box.x1 + dx), min(1.0, box.y1 + dy))


def _inside_by_margin(boxes: list[Box]) -> dict[str, float]:
    """Share of clean films whose lung box grown by each margin stays inside the frame on all four sides.

    Where it does, the crop's edges are set by the anatomy; where it does not, by the film's edge.
    """
    out = {}
    for margin in (0.0, 0.05, 0.10, 0.15, 0.20):
        inside = [
            b.x0 - margin * b.width > 0
            and b.y0 - margin * b.height > 0
            and b.x1 + margin * b.width < 1
            and b.y1 + margin * b.height < 1
            for b in boxes
            if b.found
        ]
        out[f"{margin:.2f}"] = round(float(np.mean(inside)), 4)
    return out


def _summary(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": round(float(array.mean()), 4),
        "median": round(float(np.median(array)), 4),
        "p5": round(float(np.percentile(array, 5)), 4),
        "share_ge_0.9": round(float((array >= 0.9).mean()), 4),
        "n": int(array.size),
    }


def equivariance(framer: Framer, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """IoU of shifted vs clean boxes on the validation films, per shift; and agreement with pseudo-labels."""
    _, val, description = train_val_samples(root, "binary", 0.15, 0)
    ious: dict[str, list[float]] = defaultdict(list)
    crops: dict[str, list[float]] = defaultdict(list)
    margin = framer.config.margin
    visible: dict[str, list[float]] = defaultdict(list)
    ceiling: dict[str, list[float]] = defaultdict(list)
    clean_found = 0
    boxes: dict[str, Box] = {}
    for sample in val:
        image = read_image(sample.path).image
        w, h = image.size
        clean = framer.locate(image)
        boxes[str(sample.path)] = clean
        clean_found += clean.found
        for shift, frame in FRAMES.items():
            shifted = shift_image(image, shift, sample.path.name)
            window = frame_pixels(frame, w, h)
            if shifted.size != (window[2] - window[0], window[3] - window[1]):
                raise AssertionError(f"{shift}: frame {window} does not match the shifted size {shifted.size}")
            found = framer.locate(shifted)
            back = to_clean(found, window, w, h)
            ious[shift].append(back.iou(clean))
            crops[shift].append(to_clean(_crop_of(found, margin), window, w, h).iou(_crop_of(clean, margin)))
            frame = Box(window[0] / w, window[1] / h, window[2] / w, window[3] / h)
            visible[shift].append(_clip(back, frame).iou(_clip(clean, frame)))
            ceiling[shift].append(_clip(clean, frame).iou(clean))
    table = {
        shift: {
            "iou": _summary(ious[shift]),
            "crop_iou": _summary(crops[shift]),
            "iou_visible": _summary(visible[shift]),
            "ceiling_in_frame": _summary(ceiling[shift]),
            "framing": shift in FRAMING_SHIFTS,
        }
        for shift in FRAMES
    }
    meta = {
        "split": description,
        "validation_films": len(val),
        "clean_found": clean_found,
        "crop_inside_frame_by_margin": _inside_by_margin(list(boxes.values())),
    }
    return table, {"meta": meta, "boxes": boxes, "samples": val}


def pseudo_label_agreement(boxes: dict[str, Box], samples: list[Any]) -> dict[str, Any]:
    """IoU of the localizer's clean boxes with the classical labeler's, where the labeler accepts the film."""
    from pneumo.modeling.localizer import load_pseudo_labels  # scipy: benchmark only

    labels = load_pseudo_labels(samples)
    values = [boxes[path].iou(Box(*label)) for path, label in labels.items() if label is not None]
    return {"accepted": len(values), "of": len(labels), "iou": _summary(values)}


def cost(framer: Framer, images: list[Image.Image], repeat: int) -> dict[str, float]:
    """Milliseconds per ``Framer.apply`` call over ``images``, ``repeat`` rounds.

    Wall time (median, mean, p95) and this thread's CPU time: on shared cores the wall time's tail
    is mostly waiting for a core, which the CPU time leaves out.
    """
    for image in images[:5]:
        framer.apply(image)  # warm the session
    times, cpu = [], []
    for _ in range(repeat):
        for image in images:
            start, start_cpu = time.perf_counter(), time.thread_time()
            framer.apply(image)
            cpu.append((time.thread_time() - start_cpu) * 1000)
            times.append((time.perf_counter() - start) * 1000)
    array, cpu_array = np.asarray(times), np.asarray(cpu)
    sizes = np.asarray([image.size for image in images])
    return {
        "median_ms": round(float(np.median(array)), 3),
        "mean_ms": round(float(array.mean()), 3),
        "p95_ms": round(float(np.percentile(array, 95)), 3),
        "cpu_median_ms": round(float(np.median(cpu_array)), 3),
        "cpu_mean_ms": round(float(cpu_array.mean()), 3),
        "calls": int(array.size),
        "median_size": [int(v) for v in np.median(sizes, axis=0)],
    }


def fallback_rates(framer: Framer, root: Path) -> dict[str, Any]:
    """Share of ``found=False`` on every training film and on each category of non-X-rays."""
    from ood_nonxray import build_nonxray_set

    films = discover(root, "train", "binary")
    missed = [s.path.name for s in films if not framer.locate(read_image(s.path).image).found]
    by_category: dict[str, list[bool]] = defaultdict(list)
    refused_by_io = 0
    for category, _, data in build_nonxray_set():
        try:
            image = read_image(data).image
        except PneumoError:
            refused_by_io += 1
            continue
        by_category[category].append(not framer.locate(image).found)
    flagged = [v for values in by_category.values() for v in values]
    return {
        "training_films": {
            "n": len(films),
            "fallback": len(missed),
            "rate": round(len(missed) / len(films), 4),
            "names": missed[:50],
        },
        "non_xray": {
            "n": len(flagged),
            "fallback_rate": round(float(np.mean(flagged)), 4),
            "refused_by_io": refused_by_io,
            "per_category": {c: round(float(np.mean(v)), 3) for c, v in sorted(by_category.items())},
        },
    }


def _draw_sheet(tiles: list[tuple[Image.Image, Framer]], columns: int, tile: int) -> Image.Image:
    """A palette PNG (grays + 3 colours, small files): lung box green, crop yellow, fallback red cross."""
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("P", (columns * tile, rows * tile), 0)
    palette = [v for g in range(253) for v in (g * 255 // 252,) * 3] + [40, 220, 40, 250, 210, 0, 230, 30, 30]
    sheet.putpalette(palette)
    for index, (image, framer) in enumerate(tiles):
        lung, crop = framer.locate(image), framer.crop_box(image)
        scale = tile / max(image.size)
        shown = image.convert("L").resize((round(image.width * scale), round(image.height * scale)))
        gray = shown.point(lambda v: v * 252 // 255)
        gray.putpalette(palette)
        x, y = (index % columns) * tile, (index // columns) * tile
        sheet.paste(gray.convert("P"), (x, y))
        draw = ImageDraw.Draw(sheet)
        w, h = shown.size
        if lung.found:
            draw.rectangle((x + crop.x0 * w, y + crop.y0 * h, x + crop.x1 * w - 1, y + crop.y1 * h - 1), outline=254)
            draw.rectangle(
                (x + lung.x0 * w, y + lung.y0 * h, x + lung.x1 * w - 1, y + lung.y1 * h - 1), outline=253, width=2
            )
        else:
            draw.line((x, y, x + w, y + h), fill=255, width=3)
            draw.line((x + w, y, x, y + h), fill=255, width=3)
    return sheet


def contact_sheets(framer: Framer, data: Path, samples: list[Any], out_dir: Path) -> list[str]:
    """``framing_validation.png`` (100 random validation films) and ``framing_fullres.png`` (the 14 originals)."""
    rng = np.random.default_rng(0)
    chosen = [samples[i] for i in sorted(rng.choice(len(samples), size=min(100, len(samples)), replace=False))]
    val_tiles = [(read_image(s.path).image, framer) for s in chosen]
    originals = sorted((data / "fullres_samples").glob("*/*.jpeg"))
    full_tiles = [(read_image(p, draft_size=240).image, framer) for p in originals]
    written = []
    for name, tiles, columns, tile in (
        ("framing_validation.png", val_tiles, 10, 128),
        ("framing_fullres.png", full_tiles, 7, 240),
    ):
        path = out_dir / name
        _draw_sheet(tiles, columns, tile).save(path, optimize=True)
        written.append(str(path))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--localizer", type=Path, default=None, help="graph to measure (default: the shipped one)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "framing_equivariance.json")
    parser.add_argument("--sheets", type=Path, default=None, help="folder for the contact sheets (e.g. docs)")
    parser.add_argument("--repeat", type=int, default=3, help="timing rounds over the films")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    framer = Framer(FramingConfig(method="lungbox-v1"), args.localizer)
    root = args.data / "chest_xray_224"
    table, clean = equivariance(framer, root)
    result: dict[str, Any] = {"localizer": str(args.localizer or "shipped lungbox-v1"), **clean["meta"]}
    result["equivariance"] = table
    result["pseudo_label_agreement"] = pseudo_label_agreement(clean["boxes"], clean["samples"])
    val_images = [read_image(s.path).image for s in clean["samples"][:200]]
    originals = sorted((args.data / "fullres_samples").glob("*/*.jpeg"))
    full_images = [read_image(p, draft_size=240).image for p in originals]
    result["cost"] = {
        "224px": cost(framer, val_images, args.repeat),
        "fullres_draft240": cost(framer, full_images, args.repeat * 10),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    result["fullres_vs_224"] = _summary(
        [
            framer.locate(image).iou(framer.locate(read_image(root / "train" / p.parent.name / p.name).image))
            for p, image in zip(originals, full_images, strict=True)
        ]
    )
    result["fallback"] = fallback_rates(framer, root)
    if args.sheets:
        result["sheets"] = contact_sheets(framer, args.data, clean["samples"], args.sheets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"{'shift':<20} {'mean':>6} {'median':>6} {'p5':>6} {'>=0.9':>6}   visible: {'mean':>6} {'p5':>6} {'>=0.9':>6}"
    )
    for shift, row in table.items():
        a, b = row["iou"], row["iou_visible"]
        print(
            f"{shift:<20} {a['mean']:>6} {a['median']:>6} {a['p5']:>6} {a['share_ge_0.9']:>6}   "
            f"         {b['mean']:>6} {b['p5']:>6} {b['share_ge_0.9']:>6}"
        )
    print(json.dumps({k: result[k] for k in ("cost", "pseudo_label_agreement", "fullres_vs_224")}, indent=1))
    print(json.dumps({k: v for k, v in result["fallback"].items()}, indent=1)[:2000])


if __name__ == "__main__":
    main()
