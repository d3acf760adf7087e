"""`python -m benchmarks.fetching [--only cpu|latency] [--before DIR]`: the HTTP client's cost and latency hiding.

  cpu      CPU per image of this process fetching from nginx (Debian's nginx-light, loopback) at
           --concurrency 32 and 256: the Fetcher alone, and `check` with the CLIP processor; with
           --before DIR also the mmprep tree in DIR (e.g. the httpcore transport), alternating
  latency  `check` (CLIP processor; --latency-rows) and the Fetcher alone at --concurrency 256 from a server
           that answers after 200 ms vs the same server answering at once: the rate ratio (latency hidden or not)
  layers   where a request's CPU goes, in this process at --concurrency 32 from nginx: aiohttp alone,
           httpx over the `httpx-aiohttp` package (if installed), httpx over GuardedTransport, the Fetcher

Every figure is measured in a fresh child process (PYTHONPATH set to the tree under test), contenders
alternating round by round, so ratios compare like with like on a shared machine; the load average is
printed with each row. CPU is the child's process time (all its threads) over the measured rows only,
after an untimed warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
LOOPBACK = {"allow_http": True, "allow_hosts": ("127.0.0.1",)}
SECTIONS = ("cpu", "latency", "layers")


# -- the child: one measurement in a fresh process -------------------------------------------------


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """Fetch (mode "fetch") or `check` (mode "check", CLIP processor) spec's URLs; CPU and wall of the measured part."""
    import asyncio

    from mmprep.settings import LoadSettings

    concurrency = spec["concurrency"]
    settings = LoadSettings(concurrency=concurrency, per_host=concurrency, timeout=60.0, **LOOPBACK)
    warm, urls = spec["warm"], spec["urls"]
    if spec["mode"] == "fetch":
        from mmprep.fetch import Fetcher

        async def fetch_all(fetcher: Any, batch: list[str]) -> int:
            gate = asyncio.Semaphore(concurrency)  # what the pipeline does

            async def one(url: str) -> int:
                async with gate:
                    got = await fetcher.fetch(url)
                    return len(got.data)

            return sum(await asyncio.gather(*(one(u) for u in batch)))

        async def go() -> tuple[float, float, int]:
            async with Fetcher(settings) as fetcher:
                await fetch_all(fetcher, warm)
                cpu, wall = time.process_time(), time.perf_counter()
                size = await fetch_all(fetcher, urls)
                return time.process_time() - cpu, time.perf_counter() - wall, size

        cpu, wall, size = asyncio.run(go())
        assert size > 0
        return {"cpu": cpu, "wall": wall, "rows": len(urls), "failed": 0}
    from transformers import CLIPImageProcessorPil

    from mmprep.models import ImagePreprocessor
    from mmprep.pipeline import CheckRun

    prepare = ImagePreprocessor(CLIPImageProcessorPil())
    work = Path(spec["work"])

    def check(batch: list[str], name: str) -> Any:
        manifest = work / f"{name}.txt"
        manifest.write_text("\n".join(batch) + "\n")
        return CheckRun([str(manifest)], settings, work / f"{name}-errors.jsonl", prepare).run()

    check(warm, "warm")
    cpu, wall = time.process_time(), time.perf_counter()
    summary = check(urls, "rows")
    return {
        "cpu": time.process_time() - cpu,
        "wall": time.perf_counter() - wall,
        "rows": len(urls),
        "failed": summary.failed,
    }


def measure(tree: Path, mode: str, concurrency: int, warm: list[str], urls: list[str], work: Path) -> dict[str, Any]:
    """One child run of `tree`'s mmprep (this file run as a script: nothing of this tree's mmprep is imported)."""
    spec = {"mode": mode, "concurrency": concurrency, "warm": warm, "urls": urls, "work": str(work)}
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=work, delete=False) as f:
        json.dump(spec, f)
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        done = subprocess.run(
            [sys.executable, str(HERE), "--child", f.name], env=env, capture_output=True, text=True, cwd=work
        )
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} c{concurrency} ({tree}) exited {done.returncode}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- a server with latency, not CPU ----------------------------------------------------------------


def _serve_latency(port_file: Path, delay: float) -> None:
    """An aiohttp server answering every GET /vga/N.jpg with unique 640x480 JPEG N after `delay` seconds."""
    import asyncio

    from aiohttp import web

    sys.path.insert(0, str(REPO))
    from benchmarks.inputs import jpeg_pool, unique_jpeg

    pool = jpeg_pool((640, 480))

    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.Response(body=unique_jpeg(pool, int(request.match_info["n"])), content_type="image/jpeg")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/vga/{n}.jpg", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = runner.addresses[0][1]
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(str(port))
        tmp.rename(port_file)
        await asyncio.Event().wait()

    asyncio.run(main())


@contextmanager
def latency_server(work: Path, delay: float) -> Iterator[str]:
    """The base URL of a `_serve_latency` child process."""
    port_file = work / f"latency-{time.monotonic_ns()}.port"
    child = subprocess.Popen([sys.executable, str(HERE), "--serve-latency", str(port_file), str(delay)], cwd=REPO)
    try:
        while not port_file.exists():
            if child.poll() is not None:
                raise RuntimeError(f"the latency server exited with {child.returncode}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port_file.read_text()}"
    finally:
        child.kill()
        child.wait()
        port_file.unlink(missing_ok=True)


# -- sections --------------------------------------------------------------------------------------


def _load() -> str:
    return "load " + "/".join(f"{x:.1f}" for x in os.getloadavg())


def _fmt(values: list[float]) -> str:
    return f"{min(values):.2f}/{statistics.median(values):.2f}"


def section_cpu(work: Path, trees: dict[str, Path], rows: int, check_rows: int, rounds: int) -> list[str]:
    """CPU ms per image, Fetcher alone and `check` (CLIP), at --concurrency 32 and 256, for each tree."""
    from benchmarks import inputs

    out = []
    with inputs.nginx_serving(work, {"vga": inputs.jpeg_pool((640, 480))}) as server:
        urls = {
            "fetch": [server.url("vga", i) for i in range(rows)],
            "check": [server.url("vga", 50_000 + i) for i in range(check_rows)],
        }
        warm = {
            "fetch": [server.url("vga", 90_000 + i) for i in range(256)],
            "check": [server.url("vga", 95_000 + i) for i in range(256)],
        }
        for mode in ("fetch", "check"):
            cpu: dict[str, list[float]] = {}
            rate: dict[str, list[float]] = {}
            server_cpu: dict[str, list[float]] = {}
            loads = []
            for _ in range(rounds):
                for name, tree in trees.items():
                    for concurrency in (32, 256):
                        key = f"{name} c{concurrency}"
                        served = server.cpu_seconds()
                        got = measure(tree, mode, concurrency, warm[mode], urls[mode], work)
                        assert got["failed"] == 0, (key, got)
                        cpu.setdefault(key, []).append(got["cpu"] / got["rows"] * 1e3)
                        rate.setdefault(key, []).append(got["rows"] / got["wall"])
                        server_cpu.setdefault(key, []).append((server.cpu_seconds() - served) / got["rows"] * 1e3)
                loads.append(_load())
            what = f"{len(urls[mode])} 640x480 JPEGs from nginx, " + (
                "Fetcher alone" if mode == "fetch" else "`check` with the CLIP processor"
            )
            out.append(f"## {what}, {rounds} alternating rounds ({'; '.join(loads)})")
            out.append("| contender | CPU ms per image (min/median) | images/s (max/median) | nginx ms per image |")
            out.append("| --- | --- | --- | --- |")
            for key in cpu:
                r = rate[key]
                out.append(
                    f"| {key} | {_fmt(cpu[key])} | {max(r):.0f}/{statistics.median(r):.0f} | {min(server_cpu[key]):.2f} |"
                )
            for name in trees:
                out.append(f"- {name}: CPU per image c256/c32 = {min(cpu[f'{name} c256']) / min(cpu[f'{name} c32']):.2f}x (min/min), "
                           f"{statistics.median(cpu[f'{name} c256']) / statistics.median(cpu[f'{name} c32']):.2f}x (median/median)")  # fmt: skip
            if len(trees) > 1:
                first, *others = trees
                for other in others:
                    for c in (32, 256):
                        out.append(f"- c{c}: {first} / {other} CPU per image = "
                                   f"{min(cpu[f'{first} c{c}']) / min(cpu[f'{other} c{c}']):.2f}x (min/min)")  # fmt: skip
            print("\n".join(out[-(len(cpu) + 3 + len(trees) + 2 * (len(trees) - 1)) :]), flush=True)
    return out


def section_latency(work: Path, tree: Path, rows: int, check_rows: int, rounds: int, delay: float = 0.2) -> list[str]:
    """Rate at --concurrency 256 from a server answering after `delay` vs at once."""
    out = []
    with latency_server(work, 0.0) as fast, latency_server(work, delay) as slow:
        servers = {"0 ms": fast, f"{delay * 1e3:.0f} ms": slow}
        for mode, n in (("check", check_rows), ("fetch", rows)):
            rate: dict[str, list[float]] = {name: [] for name in servers}
            cpu: dict[str, list[float]] = {name: [] for name in servers}
            loads = []
            for i in range(rounds):
                for name, base in servers.items() if i % 2 == 0 else reversed(servers.items()):
                    urls = [f"{base}/vga/{k}.jpg" for k in range(n)]
                    warm = [f"{base}/vga/{90_000 + k}.jpg" for k in range(64)]
                    got = measure(tree, mode, 256, warm, urls, work)
                    assert got["failed"] == 0, (name, got)
                    rate[name].append(got["rows"] / got["wall"])
                    cpu[name].append(got["cpu"] / got["rows"] * 1e3)
                loads.append(_load())
            slow_name = f"{delay * 1e3:.0f} ms"
            what = "`check` with the CLIP processor" if mode == "check" else "Fetcher alone"
            out.append(
                f"## {n} 640x480 JPEGs, --concurrency 256, {what}, server latency 0 vs {slow_name}, {rounds} alternating rounds ({'; '.join(loads)})"
            )
            out.append("| server | images/s (max/median) | CPU ms per image (min/median) |")
            out.append("| --- | --- | --- |")
            for name in servers:
                out.append(
                    f"| {name} | {max(rate[name]):.0f}/{statistics.median(rate[name]):.0f} | {_fmt(cpu[name])} |"
                )
            out.append(f"- rate with {slow_name} latency / without: {max(rate[slow_name]) / max(rate['0 ms']):.2f}x (best runs), "
                       f"{statistics.median(rate[slow_name]) / statistics.median(rate['0 ms']):.2f}x (medians)")  # fmt: skip
            print("\n".join(out[-(len(servers) + 4) :]), flush=True)
    return out


def section_layers(work: Path, rows: int, rounds: int, concurrency: int = 32) -> list[str]:
    """CPU ms per request of each layer of the stack, alternating in this process (bodies read raw, in full)."""
    import asyncio

    import aiohttp
    import httpx

    from benchmarks import inputs
    from mmprep.fetch import Fetcher
    from mmprep.fetch.policy import UrlPolicy
    from mmprep.fetch.transport import GuardedTransport
    from mmprep.settings import LoadSettings

    async def drive(fetch: Any, urls: list[str]) -> float:
        gate = asyncio.Semaphore(concurrency)

        async def one(url: str) -> None:
            async with gate:
                assert len(await fetch(url)) > 0

        await asyncio.gather(*(one(u) for u in urls[:100]))  # warm-up: the pool opens
        cpu = time.process_time()
        await asyncio.gather(*(one(u) for u in urls[100:]))
        return (time.process_time() - cpu) / (len(urls) - 100) * 1e3

    async def raw_aiohttp(urls: list[str]) -> float:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

            async def fetch(url: str) -> bytes:
                async with session.get(url) as response:
                    return b"".join([chunk async for chunk in response.content.iter_any()])

            return await drive(fetch, urls)

    async def over_httpx(urls: list[str], client: httpx.AsyncClient) -> float:
        async with client:

            async def fetch(url: str) -> bytes:
                async with client.stream("GET", url) as response:
                    return b"".join([chunk async for chunk in response.aiter_raw()])

            return await drive(fetch, urls)

    def guarded() -> httpx.AsyncClient:
        policy = UrlPolicy(**LOOPBACK)
        return httpx.AsyncClient(transport=GuardedTransport(policy, max_connections=concurrency))

    async def fetcher(urls: list[str]) -> float:
        async with Fetcher(LoadSettings(concurrency=concurrency, per_host=concurrency, **LOOPBACK)) as f:

            async def fetch(url: str) -> bytes:
                return (await f.fetch(url)).data  # type: ignore[union-attr]

            return await drive(fetch, urls)

    layers: dict[str, Any] = {"aiohttp alone": raw_aiohttp}
    try:
        from httpx_aiohttp import HttpxAiohttpClient

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        layers["httpx over httpx-aiohttp"] = lambda urls: over_httpx(
            urls, HttpxAiohttpClient(limits=limits, trust_env=False)
        )
    except ImportError:
        pass
    layers["httpx over GuardedTransport"] = lambda urls: over_httpx(urls, guarded())
    layers["Fetcher"] = fetcher
    cpu: dict[str, list[float]] = {name: [] for name in layers}
    with inputs.nginx_serving(work, {"vga": inputs.jpeg_pool((640, 480))}) as server:
        urls = [server.url("vga", 70_000 + i) for i in range(rows + 100)]
        for _ in range(rounds):
            for name, layer in layers.items():
                cpu[name].append(asyncio.run(layer(urls)))
    out = [
        f"## CPU ms per request by layer, {rows} 640x480 JPEGs from nginx, c{concurrency}, {rounds} alternating rounds ({_load()})"
    ]
    out += ["| layer | CPU ms per request (min/median) |", "| --- | --- |"]
    out += [f"| {name} | {_fmt(values)} |" for name, values in cpu.items()]
    print("\n".join(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SECTIONS)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmprep-bench-fetching")
    parser.add_argument(
        "--before", type=Path, help="an older mmprep source tree to measure beside this one (cpu section)"
    )
    parser.add_argument("--rows", type=int, default=2000, help="URLs the Fetcher-alone runs fetch")
    parser.add_argument("--check-rows", type=int, default=1000, help="rows of the `check` runs")
    parser.add_argument("--latency-rows", type=int, default=4000,
                        help="rows of the latency section's `check` runs: many times --concurrency 256, so that the "
                             "first 200 ms (nothing has arrived) and the last (the pipeline drains) do not decide")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    sections = args.only or list(SECTIONS)
    trees = {"now": REPO}
    if args.before is not None:
        trees["before"] = args.before.resolve()
    out = [f"# benchmarks.fetching on {os.cpu_count()} cores, {_load()} at the start"]
    if "cpu" in sections:
        out += section_cpu(args.work, trees, args.rows, args.check_rows, args.rounds)
    if "latency" in sections:
        out += section_latency(args.work, REPO, args.rows, args.latency_rows, args.rounds)
    if "layers" in sections:
        out += section_layers(args.work, args.rows, args.rounds)
    out.append(f"{_load()} at the end")
    print("\n".join(out))


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "--child":
    print(json.dumps(_child(json.loads(Path(sys.argv[2]).read_text()))))
elif __name__ == "__main__" and len(sys.argv) > 3 and sys.argv[1] == "--serve-latency":
    _serve_latency(Path(sys.argv[2]), float(sys.argv[3]))
elif __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run as a script, or with -m from the repository root
    main()
