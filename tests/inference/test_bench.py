"""``pneumo bench``: runs on a tiny model and writes the documented JSON (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from export_helpers import exported_tiny_bundle_fixture  # noqa: F401 (session fixture)
from model_helpers import tiny_bundle
from PIL import Image
from typer.testing import CliRunner

from pneumo.cli import app
from pneumo.inference.bench import BenchSettings, format_table, run_bench, synthesize_xrays
from pneumo.inference.bench.floor import SPEED_FLAGS, physical_floor
from pneumo.modeling.torch_backend import model_flops

#: Whether OpenVINO is installed (the [openvino] extra, part of [dev]): the bench then adds its columns.
OPENVINO = importlib.util.find_spec("openvino") is not None

METRICS = (
    "throughput_ips",
    "e2e_throughput_ips",
    "latency_p50_ms",
    "latency_p95_ms",
    "cpu_ms_per_image",
    "peak_rss_mb",
)


@pytest.mark.slow
def test_pneumo_bench_writes_json_for_both_backends(exported_tiny_bundle: Path, tmp_path: Path) -> None:
    """The real command, each backend in its own process (~20 s on 2 shared cores)."""
    bundle = exported_tiny_bundle
    out = tmp_path / "bench.json"
    args = ["bench", "--model", str(bundle), "--json", str(out), "--n-images", "2", "--runs", "1"]
    result = CliRunner().invoke(app, [*args, "--batch-size", "4", "--batches", "1", "--no-startup"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    columns = ["torch", "fp32"] + (["openvino-fp32"] if OPENVINO else [])
    for backend in columns:
        assert data[backend]["backend"] == backend.removesuffix("-fp32")  # each column measured what it says
        assert data[backend]["graph"] == (None if backend == "torch" else "fp32")
        for key in METRICS:
            assert isinstance(data[backend][key], float) and data[backend][key] > 0, (backend, key)
        assert data[backend]["latency_p95_ms"] >= data[backend]["latency_p50_ms"]
        assert set(data[backend]["stage_p50_ms"]) == {"decode", "preprocess", "model"}
        assert data[backend]["failed"] == 0
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu_model"]
    if Path("/proc/cpuinfo").is_file() and data["machine"]["machine"] == "x86_64":  # x86-64 CPUs since 2013: FMA
        assert data["machine"]["cpu_flags"] and set(data["machine"]["cpu_flags"]) <= set(SPEED_FLAGS)
    assert {"torch", "onnxruntime", "pillow", "python"} <= set(data["versions"])
    assert data["floor"]["gflops_per_image"] > 0
    assert data["speedup_fp32_vs_torch"]["throughput_ips"] == pytest.approx(
        data["fp32"]["throughput_ips"] / data["torch"]["throughput_ips"], rel=0.01
    )
    assert ("| | fp32 | openvino-fp32 | torch |" if OPENVINO else "| | fp32 | torch |") in result.output
    assert "model throughput, batch 4 (img/s)" in result.output
    assert data["skipped"]["int8"] == "the bundle has no valid INT8 graph"
    assert data["auto_backend"] == {"backend": "fp32", "graph": "fp32"}  # no OpenVINO check recorded for it
    options = data["decode_options"]
    # The tiny bundle does not frame its films: it decodes at the 0.75 draft fraction.
    assert list(options) == ["1", "0.75", "0.5"] and options["0.75"]["default"] and not options["1"]["default"]
    assert options["1"]["draft_size"] == 64 and options["0.5"]["draft_size"] == 32  # the tiny bundle: 64 px input
    # Coarser drafts never decode larger films; every figure is a positive time.
    assert options["0.5"]["decoded_short_side_mean"] <= options["1"]["decoded_short_side_mean"]
    assert all(row[key] > 0 for row in options.values() for key in ("decode_p50_ms", "preprocess_p50_ms"))
    if OPENVINO:
        assert data["openvino"]["graph"] == "fp32" and data["openvino"]["checked"] is False
        assert "no recorded OpenVINO check" in data["openvino"]["unchecked_reason"]
        assert data["speedup_openvino-fp32_vs_fp32"]["throughput_ips"] == pytest.approx(
            data["openvino-fp32"]["throughput_ips"] / data["fp32"]["throughput_ips"], rel=0.01
        )
    else:
        assert "OpenVINO is not installed" in data["skipped"]["openvino"]


def test_run_bench_in_process_on_given_images(tmp_path: Path) -> None:
    """``--images``: the files given are used (not synthesized), one backend, no subprocess."""
    bundle = tiny_bundle(tmp_path / "bundle", export=False)[0]
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.new("L", (300 + 10 * index, 280), color=40 + 60 * index).save(images / f"x{index}.jpeg", quality=90)
    (images / "notes.txt").write_text("not an image")
    settings = BenchSettings(bundle=bundle, images=images, runs=1, batch_size=2, batches=1, backends=("torch",),
                             preload=("pneumo.modeling.torch_backend",))  # fmt: skip
    settings.isolate, settings.torch_threads = False, 1
    threads = torch.get_num_threads()
    data = run_bench(settings)
    assert data["torch"]["threads"] == 1  # the setting was applied while measuring ...
    assert torch.get_num_threads() == threads  # ... and undone afterwards
    assert data["inputs"] == f"3 files from {images}"
    assert data["input_pixels_mean"] == round((300 * 280 + 310 * 280 + 320 * 280) / 3)
    assert "fp32" not in data and "speedup_fp32_vs_torch" not in data
    assert data["torch"]["backend"] == "torch" and data["torch"]["latency_p50_ms"] > 0
    json.dumps(data)  # JSON-able as is


def test_bench_refuses_unknown_backends_and_bad_fractions() -> None:
    result = CliRunner().invoke(app, ["bench", "--backends", "torch,tensorrt"])
    assert result.exit_code == 2
    assert "--backends" in result.output
    result = CliRunner().invoke(app, ["bench", "--draft-fractions", "1,2"])
    assert result.exit_code == 2
    assert "--draft-fractions takes numbers in (0, 1]" in result.output


def test_synthetic_xrays_are_full_resolution_grayscale_jpegs(tmp_path: Path) -> None:
    paths = synthesize_xrays(tmp_path, 2, seed=3)
    assert len(paths) == 2 and paths[0].read_bytes()[:3] == b"\xff\xd8\xff"
    for path in paths:
        with Image.open(path) as image:
            assert image.mode == "L" and image.format == "JPEG"
            assert 1500 <= max(image.size) <= 2500 and min(image.size) >= 1100
            bytes_per_pixel = path.stat().st_size / (image.size[0] * image.size[1])
        assert 0.05 < bytes_per_pixel < 0.5  # realistic entropy, so decoding costs what a real film costs
    assert synthesize_xrays(tmp_path / "again", 1, seed=3)[0].read_bytes() == paths[0].read_bytes()


def test_physical_floor_arithmetic() -> None:
    floor = physical_floor(flops=2_000_000_000, cores=2, mhz=2500.0)
    assert floor["peak_gflops"] == 160.0  # 2 cores x 2.5 GHz x 32 FLOP/cycle
    assert floor["floor_ms_per_image"] == 12.5
    assert floor["ceiling_ips"] == 80.0
    assert physical_floor(flops=10**9, cores=2, mhz=None)["peak_gflops"] is None


def test_model_flops_scale_with_the_number_of_pixels(tmp_path: Path) -> None:
    """Convolutions dominate: 4x the pixels gives ~4x the FLOPs (the head adds a constant)."""
    small = model_flops(tiny_bundle(tmp_path / "s", input_size=64, export=False)[0])
    large = model_flops(tiny_bundle(tmp_path / "l", input_size=128, export=False)[0])
    assert small > 1e6
    assert 3.8 < large / small <= 4.0


def test_format_table_lists_backends_and_marks_missing_values() -> None:
    result = {
        "torch": {"throughput_ips": 20.0, "latency_p50_ms": 40.0, "stage_p50_ms": {"model": 30.0}},
        "fp32": {"throughput_ips": 80.5, "latency_p50_ms": 12.25, "gradcam_p50_ms": 55.0},
        "machine": {"cores": 2, "cpu_model": "Test CPU", "cpu_flags": ["avx2", "avx512_vnni"], "loadavg_1m": 0.1},
        "floor": {"gflops_per_image": 0.77, "peak_gflops": None},
    }
    table = format_table(result)
    assert "| | fp32 | torch |" in table
    assert "| model throughput, batch 32 (img/s) | 80.5 | 20 |" in table
    assert "| heatmap p50 (ms; CAM from the ONNX graph) | 55 | - |" in table
    assert "|   model p50 (ms) | - | 30 |" in table
    assert "peak RSS" not in table  # rows with no value at all are left out
    assert "JPEG draft fraction" not in table  # no decode options measured
    assert "2 cores, Test CPU (avx2, avx512_vnni)" in table  # the INT8 speed depends on VNNI


def test_format_table_shows_openvino_columns_decode_options_and_the_auto_choice() -> None:
    row = {"throughput_ips": 300.0, "latency_p50_ms": 6.5}
    options = {"1": {"draft_size": 240, "default": True, "decoded_short_side_mean": 350.0, "decode_p50_ms": 3.2,
                     "decode_cpu_ms_mean": 3.1, "preprocess_p50_ms": 0.5}}  # fmt: skip
    result = {
        "int8": {"throughput_ips": 200.0},
        "openvino-int8": row,
        "openvino-fp32": {"throughput_ips": 250.0},
        "decode_options": options,
        "auto_backend": {"backend": "openvino", "graph": "int8"},
        "openvino": {"version": "2026.4.1", "cpu_isa": "avx512_vnni", "graph": "int8", "checked": True},
        "machine": {"cores": 2, "cpu_model": "Test CPU", "cpu_flags": [], "loadavg_1m": 0.1},
        "floor": {"gflops_per_image": None, "peak_gflops": None},
    }
    table = format_table(result)
    assert "| | int8 | openvino-int8 | openvino-fp32 |" in table
    assert "| model throughput, batch 32 (img/s) | 200 | 300 | 250 |" in table
    assert "| 1 (default) | 240 | 350 | 3.2 | 3.1 | 0.5 |" in table
    assert "`auto` serves here: openvino (int8 graph)." in table
    assert "OpenVINO 2026.4.1 on avx512_vnni: `backend=openvino` runs the int8 graph (checked)." in table
