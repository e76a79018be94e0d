"""`twotower serve` as a real server on a loopback port, at its edges: an index rebuilt under it, slow clients,
requests the HTTP layer answers itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import SAMPLE, sample_pairs

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("edges")
    sample_pairs(folder / "pairs.parquet", 300)
    env = {**os.environ, "TWOTOWER_MODEL_NGRAM_BUCKETS": "8192", "TWOTOWER_MODEL_HIDDEN_DIM": "16",
           "TWOTOWER_MODEL_EMBEDDING_DIM": "16"}
    res = subprocess.run([sys.executable, "-m", "twotower_cli", "train", "pairs.parquet", "--epochs", "1",
                          "--no-report"], cwd=folder, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    docs = pl.read_parquet(SAMPLE)["document"].unique().sort()
    pl.DataFrame({"document": docs[:1000]}).write_parquet(folder / "first.parquet")
    pl.DataFrame({"document": docs[1000:2200]}).write_parquet(folder / "second.parquet")
    pl.DataFrame({"document": docs[2200:2500]}).write_parquet(folder / "third.parquet")
    return folder


def cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twotower_cli", *args], cwd=folder, capture_output=True, text=True)


class Server:
    def __init__(self, folder: Path, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "twotower_cli", "serve", "--port", str(self.port), *args],
                                     cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(300):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.proc.kill()
        raise AssertionError("the server did not start: " + self.proc.stderr.read())

    def stop(self) -> str:
        self.proc.terminate()
        return self.proc.communicate(timeout=20)[1]


def test_a_served_index_rebuilt_under_the_server_answers_from_the_new_build_whole(folder):
    assert cli(folder, "index", "first.parquet", "--name", "sv").returncode == 0
    server = Server(folder, "--index", "sv")
    try:
        for corpus, count in (("second.parquet", 1200), ("third.parquet", 300), ("first.parquet", 1000)):
            res = cli(folder, "index", corpus, "--name", "sv")
            assert res.returncode == 0, res.stderr
            for query in ("GNU C compiler", "text editor", "python library"):
                served = httpx.post(server.url + "/search", json={"queries": [query], "k": 5})
                assert served.status_code == 200, served.text
                fresh = json.loads(cli(folder, "search", query, "--index", "sv", "-k", "5", "--json").stdout)
                assert served.json()["results"] == fresh["results"], (corpus, query)
            health = httpx.get(server.url + "/health").json()
            assert health["documents"] == count and health["index_built"]
    finally:
        server.stop()


def raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


@pytest.mark.slow
def test_slow_clients_cannot_hold_the_server_and_every_error_is_json(folder):
    server = Server(folder, "--timeout", "1")
    slow = []
    try:
        for _ in range(300):  # partial headers, never finished
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            slow.append(s)
        ok = httpx.post(server.url + "/search", json={"queries": ["GNU C compiler"], "k": 2}, timeout=10)
        assert ok.status_code == 200 and len(ok.json()["results"][0]["hits"]) == 2
        time.sleep(2.5)
        answered = slow[0].recv(4096)
        assert answered.startswith(b"HTTP/1.1 408") and b'"error"' in answered
        # a body shorter than its Content-Length: a 408 once the body's time (3 x 1 s) is up
        head = b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        t = time.monotonic()
        answered = raw(server.port, head + b'{"queries"', wait=10)
        assert answered.startswith(b"HTTP/1.1 408") and b'"error"' in answered and time.monotonic() - t < 8
        for bad in (b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                    b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
                    bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40):  # the start of a TLS hello
            answered = raw(server.port, bad)
            status, _, body = answered.partition(b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 4") and json.loads(body)["error"], answered[:200]
    finally:
        for s in slow:
            s.close()
        err = server.stop()
    assert "Traceback" not in err


def test_the_docs_page_works_offline_and_the_schema_is_clean(folder):
    server = Server(folder)
    try:
        page = httpx.get(server.url + "/docs").text
        assert "/search" in page and "cdn" not in page.lower() and "<script" not in page
        assert "/search" in httpx.get(server.url + "/openapi.json").json()["paths"]
        assert httpx.head(server.url + "/health").status_code == 200
    finally:
        err = server.stop()
    assert "Duplicate Operation ID" not in err


def test_at_the_connection_cap_the_longest_idle_connection_makes_room(folder):
    server = Server(folder, "--max-connections", "4")
    idle = []
    try:
        for _ in range(4):  # connected, saying nothing
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
            time.sleep(0.05)
        ok = httpx.post(server.url + "/search", json={"queries": ["GNU C compiler"], "k": 2}, timeout=10)
        assert ok.status_code == 200
        idle[0].settimeout(5)
        assert idle[0].recv(100) == b""  # the oldest was closed to make room
        idle[-1].settimeout(0.3)
        with pytest.raises(socket.timeout):  # the newest is still open
            idle[-1].recv(100)
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_a_client_that_stops_reading_its_answer_is_cut_off(folder):
    server = Server(folder, "--timeout", "0.5")  # an answer unread for 1.5 s
    try:
        body = json.dumps({"queries": [f"query {i}" for i in range(30)], "k": 300}).encode()
        request = (f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", server.port))
        for _ in range(4):  # answers of a few MB each, never read
            s.sendall(request)
        time.sleep(4)
        s.settimeout(5)
        received, ended = 0, False
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
            ended = True
        except ConnectionResetError:
            ended = True
        except socket.timeout:
            pass
        s.close()
        one = len(httpx.post(server.url + "/search", content=body, headers={"Content-Type": "application/json"},
                             timeout=30).content)
        assert ended and received < 3 * one, f"{received:,} bytes of 4 answers of {one:,} bytes each"
    finally:
        err = server.stop()
    assert "Traceback" not in err
