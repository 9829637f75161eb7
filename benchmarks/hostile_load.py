"""Goodput of legitimate clients with and without hostile clients attacking ``pneumo serve`` (issue 22).

    python benchmarks/hostile_load.py [--clients 8] [--hostile 2] [--seconds 60] [--workers 1] [--no-auth]

Starts ``pneumo serve`` on a free 127.0.0.1 port (with an API key per client unless ``--no-auth``),
then runs two phases of ``--seconds`` each:

1. **idle**: ``--clients`` legitimate clients in a closed loop, each sending the mixed load of
   ``benchmarks/load_test.py`` (70% real X-rays from ``--data``, 30% invalid uploads of every
   kind), honouring ``Retry-After`` on a 503;
2. **attack**: the same clients while ``--hostile`` clients attack, each with its own valid key
   (a stolen key: an unauthenticated attacker is refused before its body is read), in processes of
their own at the lowest priority (they stand for other machines). Each hostile
   client keeps ``--slowloris`` connections with unfinished headers open, trickles a request body
   (one byte a second), and in a loop sends decode bombs (``tests/hostile_inputs.py``: the
   issue-12 worst cases), a multipart part flood (990 parts of 330 KB to ``/v1/predict/batch``),
   a text-field flood (990 fields of 220 KB) and, with ``--cpu-bombs``, a progressive JPEG whose
   last scan repeats 5,000 times (stopped by the decoder's deadline, not by the API).

Goodput is the valid X-rays answered (200, or 422 ``not_a_chest_xray``) per second. Reports, per
phase: goodput, p50/p95 latency of those answers, the 503 share of the legitimate attempts, and
the server's RSS (all its processes: start, peak, end); the ratio attack/idle goodput (target
>= 0.8). Writes ``--out`` (JSON). Only loopback is used; every loop stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))
from load_test import HOST, _free_port, payloads, schedule, wait_healthy  # noqa: E402


def _process_tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its children (``--workers N``), from /proc."""
    total, family = 0, {pid}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    family.add(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    for member in family:
        try:
            status = Path(f"/proc/{member}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            continue
    return total / 1024


def cpu_bomb_jpeg(repeats: int = 5000) -> bytes:
    """A progressive JPEG whose last scan is repeated ``repeats`` times (each repeat costs a full scan decode)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    gray = np.random.default_rng(0).integers(0, 256, (1024, 1024), dtype=np.uint8)
    Image.fromarray(gray).save(buffer, "JPEG", progressive=True, quality=90)
    data = buffer.getvalue()
    last_scan = data.rfind(b"\xff\xda")
    return data[:-2] + data[last_scan:-2] * repeats + b"\xff\xd9"


def _streamed_parts(count: int, size: int, files: bool) -> tuple[Any, str]:
    boundary = "hostileboundary"
    filler = b"\xff" * size

    async def body() -> Any:
        for i in range(count):
            name = f'name="files"; filename="{i}.jpeg"' if files else f'name="field{i}"'
            yield f"--{boundary}\r\nContent-Disposition: form-data; {name}\r\n\r\n".encode() + filler + b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return body(), f"multipart/form-data; boundary={boundary}"


async def _slowloris(port: int, count: int, stop: float, log: Counter[str]) -> None:
    """Keep ``count`` connections whose headers never finish; reopen the ones the server closes."""
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    while time.monotonic() < stop:
        held = [(r, w) for r, w in held if not w.is_closing() and not r.at_eof()]
        while len(held) < count:
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
                held.append((reader, writer))
                log["slowloris_opened"] += 1
            except OSError:
                log["slowloris_refused"] += 1
                break
        for _, writer in held:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(b"a")
        await asyncio.sleep(2)
    for _, writer in held:
        writer.close()


async def _slow_body(port: int, token: str | None, stop: float, log: Counter[str]) -> None:
    """A request body sent one byte a second, again and again."""
    while time.monotonic() < stop:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            auth = f"Authorization: Bearer {token}\r\n" if token else ""
            writer.write(
                f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
                "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n--b\r\n".encode()
            )
            while time.monotonic() < stop and not reader.at_eof():
                writer.write(b"x")
                await writer.drain()
                try:
                    answer = await asyncio.wait_for(reader.read(200), 1.0)
                except TimeoutError:
                    continue
                if answer:
                    log[f"slow_body_{answer.split(b' ')[1].decode(errors='replace')}"] += 1
                    break
            writer.close()
        except OSError:
            log["slow_body_refused"] += 1
            await asyncio.sleep(1)


async def hostile_client(
    base: str, port: int, token: str | None, bombs: list[tuple[str, bytes]], stop: float, options: Any
) -> Counter[str]:
    log: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    attacks = set(options.attacks.split(","))
    background = []
    if "slowloris" in attacks:
        background.append(asyncio.create_task(_slowloris(port, options.slowloris, stop, log)))
    if "slow_body" in attacks:
        background.append(asyncio.create_task(_slow_body(port, token, stop, log)))
    loop = [kind for kind in ("bomb", "part_flood", "field_flood", "bomb") if kind in attacks]
    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout) as client:
        attack = 0
        while loop and time.monotonic() < stop:
            kind = loop[attack % len(loop)]
            attack += 1
            try:
                if kind == "bomb":
                    name, data = bombs[attack % len(bombs)]
                    response = await client.post("/v1/predict", files={"file": (name, data)})
                else:
                    flood = kind == "part_flood"
                    body, content_type = _streamed_parts(990, 330_000 if flood else 220_000, flood)
                    response = await client.post(
                        "/v1/predict/batch", content=body, headers={"content-type": content_type}
                    )
                try:
                    code = response.json()["error"]["code"] if response.status_code != 200 else "ok"
                except (ValueError, KeyError, TypeError):
                    code = "?"
                log[f"{kind} {response.status_code} {code}"] += 1
            except httpx.HTTPError as err:
                log[f"{kind} client_{type(err).__name__}"] += 1
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    return log


async def legit_client(
    base: str, token: str | None, plan: list[tuple[str, str, bytes]], stop: float, records: list[dict[str, Any]]
) -> None:
    """A closed-loop client: one request at a time, honouring Retry-After; records each request's start time."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(120.0)) as client:
        index = 0
        while time.time() < stop:
            kind, name, body = plan[index % len(plan)]
            index += 1
            started, start = time.time(), time.perf_counter()
            try:
                response = await client.post("/v1/predict", files={"file": (name, body)})
                status = response.status_code
                code = "" if status == 200 else response.json().get("error", {}).get("code", "")
            except (httpx.HTTPError, ValueError) as err:
                status, code, response = 0, f"client_{type(err).__name__}", None
            latency = time.perf_counter() - start
            records.append({"kind": kind, "status": status, "code": code, "latency": latency, "at": started})
            if status == 503 and response is not None:
                await asyncio.sleep(min(2.0, float(response.headers.get("retry-after", "1"))))


def summarize(records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    good = [r for r in records if r["kind"] == "valid" and (r["status"] == 200 or r["code"] == "not_a_chest_xray")]
    latencies = np.array([r["latency"] for r in good]) * 1000 if good else np.array([0.0])
    return {
        "attempts": len(records),
        "seconds": round(seconds, 1),
        "goodput_per_s": round(len(good) / seconds, 2),
        "latency_ms_good": {
            "p50": round(float(np.percentile(latencies, 50)), 1),
            "p95": round(float(np.percentile(latencies, 95)), 1),
        },
        "busy_503_share": round(sum(r["status"] == 503 for r in records) / max(1, len(records)), 4),
        "client_errors": sum(r["status"] == 0 for r in records),
        "server_errors_non_503": sum(r["status"] >= 500 and r["status"] != 503 for r in records),
        "statuses": dict(Counter(f"{r['status']} {r['code']}".strip() for r in records).most_common()),
    }


def windows(start: float, options: Any) -> list[tuple[str, float, float]]:
    """Alternating idle and attack windows: the background load of a shared machine drifts over both alike."""
    if options.hostile == 0:  # the plain mixed load: one window
        return [("idle", start, start + options.seconds)]
    length = options.seconds / options.rounds
    out = []
    for round_ in range(options.rounds):
        first = start + 2 * round_ * length
        out += [("idle", first, first + length), ("attack", first + length, first + 2 * length)]
    return out


async def run_rounds(base: str, port: int, tokens: dict[str, str | None], kinds: Any, options: Any) -> dict:
    """Legit clients through every window; the hostile clients (their own processes) in the attack windows."""
    bombs = [item for key, items in kinds.items() if key.startswith("worst_") for item in items]
    if options.cpu_bombs:
        bombs.append(("cpu_bomb.jpeg", cpu_bomb_jpeg()))
    plan = windows(time.time() + 15, options)  # 15 s for the attackers' processes to start, before any window
    attack_windows = [(start, end) for kind, start, end in plan if kind == "attack"]
    # The attackers run in processes of their own: their floods must not slow this process's clients down.
    context = multiprocessing.get_context("spawn")
    outcomes = context.Queue()
    attackers = [
        context.Process(
            target=_hostile_process, args=(base, port, tokens[f"hostile{i}"], bombs, attack_windows, options, outcomes)
        )
        for i in range(options.hostile)
    ]
    for attacker in attackers:
        attacker.start()
    await asyncio.sleep(max(0.0, plan[0][1] - time.time()))
    records: list[dict[str, Any]] = []
    await asyncio.gather(
        *(
            legit_client(base, tokens[f"legit{i}"], schedule(kinds, 500, options.seed + i), plan[-1][2], records)
            for i in range(options.clients)
        )
    )
    hostile: Counter[str] = Counter()
    for attacker in attackers:
        hostile.update(await asyncio.to_thread(outcomes.get, True, 300))
        attacker.join(timeout=30)
    result = {}
    for phase in sorted({kind for kind, _, _ in plan}, reverse=True):  # idle, then attack
        spans = [(start, end) for kind, start, end in plan if kind == phase]
        mine = [r for r in records if any(start <= r["at"] < end for start, end in spans)]
        result[phase] = summarize(mine, sum(end - start for start, end in spans))
    if "attack" in result:
        result["attack"]["hostile"] = dict(hostile)
    return result


def _hostile_process(
    base: str, port: int, token: str | None, bombs: list, spans: list[tuple[float, float]], options: Any, out: Any
) -> None:
    os.nice(19)  # attackers stand for other machines: their own CPU should not be taken from the server's

    async def attack() -> Counter[str]:
        log: Counter[str] = Counter()
        for start, end in spans:
            await asyncio.sleep(max(0.0, start - time.time()))
            stop = time.monotonic() + max(0.0, end - time.time())
            log.update(await hostile_client(base, port, token, bombs, stop, options))
        return log

    out.put(dict(asyncio.run(attack())))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--hostile", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0, help="Seconds of each phase, all rounds together.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating idle/attack windows per phase.")
    parser.add_argument("--slowloris", type=int, default=200, help="Unfinished connections per hostile client.")
    parser.add_argument("--cpu-bombs", action="store_true", help="Also send a 5,000-scan progressive JPEG.")
    parser.add_argument(
        "--attacks", default="bomb,part_flood,field_flood,slowloris,slow_body", help="Attacks to run (comma list)."
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-auth", action="store_true", help="Serve without keys (also: servers before issue 22).")
    parser.add_argument("--serve-args", default="", help="More `pneumo serve` options, space-separated.")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "hostile_load.json")
    options = parser.parse_args()

    kinds = payloads(options.data, options.seed)
    port = _free_port()
    base = f"http://{HOST}:{port}"
    names = [f"legit{i}" for i in range(options.clients)] + [f"hostile{i}" for i in range(options.hostile)]
    tokens: dict[str, str | None] = dict.fromkeys(names)
    command = [sys.executable, "-m", "pneumo.cli", "serve", "--host", HOST, "--port", str(port)]
    command += ["--workers", str(options.workers)] if options.workers > 1 else []
    command += options.serve_args.split()
    command += ["--model", str(options.model)] if options.model else []
    with tempfile.TemporaryDirectory() as scratch:
        if not options.no_auth:
            from pneumo.api.auth import add_key

            keys = Path(scratch) / "keys.json"
            tokens = {name: add_key(keys, name, ["predict"]) for name in names}
            command += ["--api-keys", str(keys)]
        log_path = Path(scratch) / "serve.log"
        server = subprocess.Popen(command, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
        try:
            wait_healthy(base, server)
            rss: dict[str, float] = {"start": _process_tree_rss_mb(server.pid)}
            warm = schedule(kinds, 40, options.seed)
            headers = {"Authorization": f"Bearer {tokens['legit0']}"} if tokens["legit0"] else {}
            for _, name, body in warm:
                httpx.post(f"{base}/v1/predict", files={"file": (name, body)}, headers=headers, timeout=120)
            rss["after_warmup"] = _process_tree_rss_mb(server.pid)
            peaks: list[float] = []

            async def sampled() -> dict:
                async def sample() -> None:
                    while True:
                        peaks.append(await asyncio.to_thread(_process_tree_rss_mb, server.pid))
                        await asyncio.sleep(0.5)

                sampler = asyncio.create_task(sample())
                try:
                    return await run_rounds(base, port, tokens, kinds, options)
                finally:
                    sampler.cancel()

            phases = asyncio.run(sampled())
            idle, attacked = phases["idle"], phases.get("attack", phases["idle"])
            rss["peak"] = max(peaks, default=0.0)
            time.sleep(5)
            rss["end"] = _process_tree_rss_mb(server.pid)
            alive = server.poll() is None
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()

    ratio = attacked["goodput_per_s"] / idle["goodput_per_s"] if idle["goodput_per_s"] else 0.0
    result = {
        "idle": idle,
        "attack": attacked,
        "goodput_ratio": round(ratio, 3),
        "target_ratio": 0.8,
        "rss_mb": {key: round(value, 1) for key, value in rss.items()},
        "server_alive_after": alive,
        "options": {k: str(v) for k, v in vars(options).items()},
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "command": " ".join(["python", "benchmarks/hostile_load.py", *sys.argv[1:]]),
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in (("idle", idle), ("attack", attacked)):
        latency = row["latency_ms_good"]
        print(
            f"{name:7s} goodput {row['goodput_per_s']:6.2f}/s  p50 {latency['p50']:7.1f} ms  "
            f"p95 {latency['p95']:7.1f} ms  503 {row['busy_503_share']:.1%}  attempts {row['attempts']}"
        )
    print(f"goodput under attack / idle: {ratio:.2f} (target >= 0.8); RSS MB {result['rss_mb']}")
    print(f"hostile outcomes: {attacked.get('hostile', {})}")
    print(f"wrote {options.out}")
    return 0 if ratio >= 0.8 and alive else 1


if __name__ == "__main__":
    random.seed(0)
    raise SystemExit(main())
