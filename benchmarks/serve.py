"""`twotower serve` under load, against the same queries through the Python API in the same process.

A bounded load test on loopback only: a fixed number of requests at 1, 4 and 16 concurrent clients; it stops by
itself. Prints p50/p99 latency and requests/s for each, and the in-process API's figures (the ratio is the
server's overhead: HTTP, JSON, the event loop).

    python benchmarks/serve.py --runs-dir runs [--requests 400]
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))  # keep this folder (it holds a tokenize.py) off sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUERIES = ["gnu c compiler", "text editor for the terminal", "python library for http requests", "font package",
           "command line tool to compress files", "documentation for the kernel", "game with puzzles",
           "database server", "image viewer", "network monitoring tool"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load(url: str, clients: int, total: int, k: int, mode: str | None) -> tuple[list[float], float]:
    import httpx

    lat: list[float] = []
    lock = threading.Lock()
    per = total // clients

    def client(c: int):
        with httpx.Client(timeout=30) as h:  # a default client: one keep-alive connection per client
            for i in range(per):
                body = {"queries": [QUERIES[(c + i) % len(QUERIES)]], "k": k, "mode": mode}
                t = time.perf_counter()
                r = h.post(url + "/search", json=body)
                dt = time.perf_counter() - t
                r.raise_for_status()
                with lock:
                    lat.append(dt)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, len(lat) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--mode", default=None, help="dense, hybrid or bm25 (default: the run's default search)")
    args = ap.parse_args()
    import httpx

    import twotower_cli

    model = twotower_cli.load(Path(args.runs_dir) / "latest")
    model.search("warm up", k=args.k, mode=args.mode)
    lat = []
    t0 = time.perf_counter()
    for i in range(args.requests):
        t = time.perf_counter()
        model.search([QUERIES[i % len(QUERIES)]], k=args.k, mode=args.mode)
        lat.append(time.perf_counter() - t)
    rows = [("Python API, in process", 1, lat, args.requests / (time.perf_counter() - t0))]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "twotower_cli", "serve", "--runs-dir", args.runs_dir, "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        for clients in (1, 4, 16):
            lat, rps = load(url, clients, args.requests, args.k, args.mode)
            rows.append((f"twotower serve, {clients} concurrent clients", clients, lat, rps))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    base = rows[0]
    print(f"{args.requests} single-query requests, k={args.k}, mode {model.resolve_mode(None, args.mode)[0]}, "
          f"{model.index.count:,} documents; {platform.machine()}, {os.cpu_count()} cores\n")
    print("| setup | p50 ms | p99 ms | requests/s | p50 vs API |\n|---|---|---|---|---|")
    for name, _, lat, rps in rows:
        print(f"| {name} | {1e3 * statistics.median(lat):.1f} | {1e3 * pct(lat, 0.99):.1f} | {rps:,.0f} | "
              f"{statistics.median(lat) / statistics.median(base[2]):.1f}x |")


if __name__ == "__main__":
    main()
