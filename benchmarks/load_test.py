"""Load test of ``pneumo serve``: a bounded mix of valid and invalid uploads from concurrent clients.

    python benchmarks/load_test.py [--requests 2000] [--concurrency 8] [--worst-share 0.1] [--model BUNDLE]

Starts ``pneumo serve`` on a free 127.0.0.1 port as a subprocess, waits for ``/health``, sends a
warm-up (every distinct upload once, then ``--warmup`` random ones), then ``--requests`` POST
/v1/predict uploads from ``--concurrency`` clients (httpx, asyncio): real X-rays from ``--data``
(224 px copies and full-resolution originals) and invalid uploads of every kind (text, empty,
truncated, a decompression-bomb header, too small, GIF, a photo, noise, an upload over the size
limit). ``--worst-share`` of the requests (default 10%) are the worst-case inputs of issue 12
(``tests/hostile_inputs.py``: a Deflated DICOM inflating to 1 GB, a DICOM whose JPEG frame
declares 13000 x 13000, 6000 x 6000 flat 16-bit PNG, float TIFF and RGBA PNG). Reports
throughput, p50/p99 latency, counts by status and error code, the share answered 503
``server_busy`` (backpressure), and the server's RSS (``/proc/PID/status``) after start, after the
warm-up and after the run, with the growth scaled to 2,000 requests.

Targets (exit status 1 when missed): zero 5xx other than 503 ``server_busy``, every valid upload
answered (200, 422 ``not_a_chest_xray`` when the gate refuses it, or 503 ``server_busy``), RSS
growth under 50 MB per 2,000 requests from warm-up to the end.
Writes ``--out`` (JSON) and prints a table. Only loopback is used.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        kb = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS"))
    return kb / 1024


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def payloads(data: Path, seed: int) -> dict[str, list[tuple[str, bytes]]]:
    """Uploads by kind: ``valid`` (real X-rays) and one kind per invalid class; (file name, bytes)."""
    rng = random.Random(seed)
    xrays = sorted((data / "chest_xray_224" / "train").rglob("*.jpeg"))
    fullres = sorted((data / "fullres_samples").rglob("*.jpeg"))
    if not xrays:
        raise SystemExit(f"No X-rays under {data}/chest_xray_224/train; pass --data.")
    valid = [(p.name, p.read_bytes()) for p in rng.sample(xrays, min(60, len(xrays)))]
    valid += [(p.name, p.read_bytes()) for p in fullres]
    good = valid[0][1]
    photo = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    import skimage.data

    sys.path.insert(0, str(REPO / "tests"))
    from bad_inputs import png_with_size

    return {
        "valid": valid,
        "text": [("notes.txt", b"chest x-ray report: no acute findings\n" * 20)],
        "empty": [("empty.jpeg", b"")],
        "truncated": [("cut.jpeg", good[: len(good) // 2])],
        "bomb": [("bomb.png", png_with_size(100_000, 100_000))],
        "too_small": [("tiny.png", _encode(Image.new("L", (32, 32), 90), "PNG"))],
        "gif": [("anim.gif", _encode(Image.new("L", (128, 128), 90), "GIF"))],
        "photo": [("astronaut.jpeg", _encode(Image.fromarray(skimage.data.astronaut()), "JPEG"))],
        "noise": [("noise.jpeg", _encode(photo, "JPEG"))],
        "oversize": [("huge.jpeg", b"\xff\xd8\xff" + os.urandom(21 * 2**20))],
        **worst_case(),
    }


def worst_case() -> dict[str, list[tuple[str, bytes]]]:
    """The hostile inputs of issue 12, one kind each (``worst_`` prefix), made by tests/hostile_inputs.py."""
    sys.path.insert(0, str(REPO / "tests"))
    from hostile_inputs import HOSTILE

    return {f"worst_{name}": [(f"{name}.bin", maker())] for name, (maker, _) in HOSTILE.items()}


def schedule(
    kinds: dict[str, list[tuple[str, bytes]]], n: int, seed: int, worst_share: float = 0.0
) -> list[tuple[str, str, bytes]]:
    """``n`` (kind, name, bytes) requests: ``worst_share`` worst-case inputs; of the rest ~70% valid, the
    others spread over the invalid kinds (oversize ~0.5%)."""
    rng = random.Random(seed)
    worst = [k for k in kinds if k.startswith("worst_")]
    invalid = [k for k in kinds if k not in ("valid", "oversize") and k not in worst]
    plan = []
    for _ in range(n):
        draw = rng.random()
        if worst and rng.random() < worst_share:
            kind = rng.choice(worst)
        else:
            kind = "valid" if draw < 0.7 else "oversize" if draw < 0.705 else rng.choice(invalid)
        name, body = rng.choice(kinds[kind])
        plan.append((kind, name, body))
    return plan


async def run_load(
    base: str, plan: list[tuple[str, str, bytes]], concurrency: int, retries: int = 3
) -> list[dict[str, Any]]:
    """Send ``plan`` with ``concurrency`` workers; one record per request (kind, status, code, latency).

    A 503 ``server_busy`` is retried after its ``Retry-After`` (at most ``retries`` times; ``busy``
    counts them); the latency includes those waits, as a client sees it.
    """
    queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    records: list[dict[str, Any]] = []
    timeout = httpx.Timeout(120.0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                kind, name, body = queue.get_nowait()
                start = time.perf_counter()
                record: dict[str, Any] = {"kind": kind, "busy": 0}
                for attempt in range(1 + retries):  # a well-behaved client honours Retry-After
                    try:
                        upload = {"file": (name, body, "application/octet-stream")}
                        response = await client.post("/v1/predict", files=upload)
                        record["status"] = response.status_code
                        record.pop("code", None)
                        if response.status_code != 200:
                            try:
                                record["code"] = response.json()["error"]["code"]
                            except (ValueError, KeyError, TypeError):
                                record["code"] = "unparsable_body"
                    except httpx.HTTPError as err:
                        record["status"] = 0
                        record["code"] = f"client_{type(err).__name__}"
                    if record.get("code") != "server_busy" or attempt == retries:
                        break
                    record["busy"] += 1
                    await asyncio.sleep(min(5.0, float(response.headers.get("retry-after", "1"))))
                record["latency"] = time.perf_counter() - start
                records.append(record)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


def summarize(records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    latencies = np.array([r["latency"] for r in records]) * 1000
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    kind_latency: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_kind[r["kind"]][f"{r['status']} {r.get('code', '')}".strip()] += 1
        kind_latency[r["kind"]].append(r["latency"] * 1000)
    valid = [r for r in records if r["kind"] == "valid"]
    answered = [
        r for r in valid if r["status"] in (200, 503) or (r["status"] == 422 and r.get("code") == "not_a_chest_xray")
    ]
    busy = sum(r["status"] == 503 and r.get("code") == "server_busy" for r in records)
    attempts = sum(1 + r["busy"] for r in records)
    busy_answers = sum(r["busy"] for r in records) + busy
    return {
        "requests": len(records),
        "seconds": round(seconds, 1),
        "throughput_rps": round(len(records) / seconds, 1),
        "latency_ms": {
            "p50": round(float(np.percentile(latencies, 50)), 1),
            "p99": round(float(np.percentile(latencies, 99)), 1),
            "max": round(float(latencies.max()), 1),
        },
        "status_counts": dict(Counter(str(r["status"]) for r in records).most_common()),
        "server_errors_5xx": sum(r["status"] >= 500 and r.get("code") != "server_busy" for r in records),
        "busy_503": busy,
        "busy_503_share": round(busy / len(records), 4),
        "attempts": attempts,
        "busy_503_share_of_attempts": round(busy_answers / attempts, 4),
        "worst_case_sent": sum(r["kind"].startswith("worst_") for r in records),
        "latency_ms_valid_200": _percentiles([r["latency"] * 1000 for r in valid if r["status"] == 200]),
        "connection_errors": sum(r["status"] == 0 for r in records),
        "valid_sent": len(valid),
        "valid_answered": len(answered),
        "valid_refused_as_not_xray": sum(r["status"] == 422 for r in valid),
        "valid_refused_busy": sum(r["status"] == 503 for r in valid),
        "by_kind": {
            kind: {
                "outcomes": dict(counts),
                "p50_ms": round(float(np.percentile(kind_latency[kind], 50)), 1),
                "p99_ms": round(float(np.percentile(kind_latency[kind], 99)), 1),
            }
            for kind, counts in sorted(by_kind.items())
        },
    }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": round(float(np.percentile(values, 50)), 1), "p99": round(float(np.percentile(values, 99)), 1)}


def start_server(
    port: int, model: Path | None, log_path: Path, extra: list[str] | None = None
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "pneumo.cli", "serve", "--host", HOST, "--port", str(port), *(extra or [])]
    if model is not None:
        command += ["--model", str(model)]
    log = log_path.open("wb")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(base: str, server: subprocess.Popen[bytes], timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"pneumo serve exited with status {server.returncode}; see its log.")
        try:
            response = httpx.get(f"{base}/health", timeout=2.0)
            if response.status_code == 200:
                return dict(response.json())
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"pneumo serve did not answer /health within {timeout:.0f} s.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--warmup", type=int, default=200, help="Random requests sent, after each distinct upload once, before the run."
    )
    parser.add_argument("--model", type=Path, default=None, help="Model bundle (default: the shipped one).")
    parser.add_argument("--worst-share", type=float, default=0.1, help="Share of worst-case (issue 12) inputs.")
    parser.add_argument("--max-concurrent", type=int, default=None, help="Passed to pneumo serve.")
    parser.add_argument("--max-queue", type=int, default=None, help="Passed to pneumo serve.")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=300.0, help="Seconds to wait for /health.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load_test.json")
    args = parser.parse_args()

    kinds = payloads(args.data, args.seed)
    port = _free_port()
    base = f"http://{HOST}:{port}"
    log_path = Path(f"/tmp/pneumo_load_test_server_{port}.log")
    extra = [f"--max-concurrent={args.max_concurrent}"] if args.max_concurrent else []
    extra += [f"--max-queue={args.max_queue}"] if args.max_queue is not None else []
    server = start_server(port, args.model, log_path, extra)
    try:
        health = wait_healthy(base, server, args.start_timeout)
        rss_start = _rss_mb(server.pid)
        every_upload_once = [(kind, name, body) for kind, items in kinds.items() for name, body in items]
        warmup = every_upload_once + schedule(kinds, args.warmup, args.seed + 1, args.worst_share)
        asyncio.run(run_load(base, warmup, args.concurrency))
        rss_before = _rss_mb(server.pid)
        peak = [rss_before]

        async def measured() -> list[dict[str, Any]]:
            async def sample() -> None:
                while True:
                    peak.append(_rss_mb(server.pid))
                    await asyncio.sleep(0.5)

            sampler = asyncio.create_task(sample())
            try:
                plan = schedule(kinds, args.requests, args.seed, args.worst_share)
                return await run_load(base, plan, args.concurrency)
            finally:
                sampler.cancel()

        start = time.perf_counter()
        records = asyncio.run(measured())
        seconds = time.perf_counter() - start
        rss_after = _rss_mb(server.pid)
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

    result = summarize(records, seconds)
    result.update(
        {
            "concurrency": args.concurrency,
            "model": health.get("model"),
            "server_alive_after": alive,
            "rss_mb": {
                "after_start": round(rss_start, 1),
                "before_run": round(rss_before, 1),
                "after_run": round(rss_after, 1),
                "peak": round(max(peak), 1),
                "growth": round(rss_after - rss_before, 1),
                "growth_per_2000_requests": round((rss_after - rss_before) * 2000 / max(1, args.requests), 1),
            },
            "worst_share": args.worst_share,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "command": " ".join(["python", "benchmarks/load_test.py", *sys.argv[1:]]),
        }
    )
    targets = {
        "zero_5xx": result["server_errors_5xx"] == 0,
        "every_valid_answered": result["valid_answered"] == result["valid_sent"],
        "rss_growth_under_50_mb_per_2000": result["rss_mb"]["growth_per_2000_requests"] < 50,
        "no_connection_errors": result["connection_errors"] == 0,
    }
    result["targets"] = targets
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    rss = result["rss_mb"]
    print(f"\npneumo serve load test: {result['requests']} requests, {args.concurrency} clients, {result['model']}")
    print(f"throughput {result['throughput_rps']} req/s over {result['seconds']} s; ", end="")
    print(f"latency p50 {result['latency_ms']['p50']} ms, p99 {result['latency_ms']['p99']} ms; ", end="")
    busy, share, other = result["busy_503"], result["busy_503_share"], result["server_errors_5xx"]
    print(f"503 server_busy after retries {busy} ({share:.1%}; {result['busy_503_share_of_attempts']:.1%} of attempts)")
    print(f"other 5xx {other}")
    print(f"server RSS {rss['before_run']} -> {rss['after_run']} MB (growth {rss['growth']} MB, peak {rss['peak']})")
    print(f"\n{'kind':12s} {'n':>5s} {'p50 ms':>8s} {'p99 ms':>8s}  outcomes")
    for kind, row in result["by_kind"].items():
        n = sum(row["outcomes"].values())
        outcomes = ", ".join(f"{k} x{v}" for k, v in row["outcomes"].items())
        print(f"{kind:12s} {n:5d} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f}  {outcomes}")
    print("\n" + "  ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in targets.items()))
    print(f"wrote {args.out}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
