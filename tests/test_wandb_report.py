import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

from tests.wandb_records import config as wandb_config
from tests.wandb_records import history
from twotower_cli.tracking.wandb_sink import choose_mode

SMALL = ["--embedding-dim", "32", "--hidden-dim", "64", "--batch-size", "64", "--max-document-length", "128",
         "--epochs", "2"]
KEY = "dummykey0123456789abcdef0123456789abcdef"


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns = []
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    srv.close()


def test_mode_choice_every_case(silent_server):
    assert choose_mode("", "", env={"WANDB_MODE": "disabled"}).mode == "disabled"
    assert choose_mode(KEY, "", env={"WANDB_MODE": "offline"}).mode == "offline"
    assert choose_mode("", "", env={"NETRC": "/nonexistent"}).reason == "no W&B API key is configured"
    t = time.monotonic()
    c = choose_mode(KEY, "", env={"WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}"}, timeout=1)
    assert c.mode == "offline" and "refused the connection" in c.reason and time.monotonic() - t < 3
    t = time.monotonic()
    c = choose_mode(KEY, "", env={"WANDB_BASE_URL": silent_server}, timeout=1)
    assert c.mode == "offline" and "did not answer" in c.reason
    assert time.monotonic() - t < 3  # bounded: never a hang


def test_offline_run_matches_metrics_and_never_leaks_the_key(cli, tiny_pairs, tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(f"WANDB_API_KEY={KEY}\n")
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    res = cli("train", tiny_pairs, *SMALL, "--runs-dir", tmp_path / "runs", "--wandb", "--wandb-project", "tt")
    assert res.exit_code == 0, res.stderr
    assert "logging offline" in res.stderr and "wandb sync" in res.stderr
    run = (tmp_path / "runs" / "latest").resolve()
    meta = json.loads((run / "run.json").read_text())
    assert meta["wandb_id"] == run.name and meta["wandb_mode"] == "offline"
    files = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1 and run.name in files[0].name
    logged = history(files[0])
    ours = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for row in logged:
        by_step.setdefault(row["_step"], {}).update(row)
    for rec in ours:
        for k, v in rec.items():
            if k != "step" and isinstance(v, float):
                assert by_step[rec["step"]][k] == pytest.approx(v), k
    assert any(r.get("retrieval/results/_type") == "table-file" for r in logged)
    assert any(r.get("similarity/positive/_type") == "histogram" for r in logged)
    cfg = wandb_config(files[0])
    assert cfg["train"]["batch_size"] == 64  # the effective configuration
    assert cfg["wandb"]["api_key"] != KEY
    # the key is nowhere: not in output, not in any file of the run folder
    assert KEY not in res.stdout + res.stderr
    for f in run.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f


def test_html_report_is_self_contained(cli, tiny_pairs, tmp_path):
    assert cli("train", tiny_pairs, *SMALL, "--runs-dir", tmp_path / "runs").exit_code == 0
    run = (tmp_path / "runs" / "latest").resolve()
    page = (run / "report.html").read_text()
    assert page.count("<svg") >= 8
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "@import" not in page
    for section in ("Training loss", "Retrieval results", "Data examples", "Configuration", "val/mrr@10"):
        assert section in page
    res = cli("report", "--runs-dir", tmp_path / "runs", "--title", "My title", "--output", tmp_path / "r.html")
    assert res.exit_code == 0 and "My title" in (tmp_path / "r.html").read_text()
    assert "not published" in res.stderr


def test_report_dry_run_spec(cli, tiny_pairs, tmp_path):
    assert cli("train", tiny_pairs, *SMALL, "--runs-dir", tmp_path / "runs", "--no-report").exit_code == 0
    run = (tmp_path / "runs" / "latest").resolve()
    res = cli("report", "--runs-dir", tmp_path / "runs", "--dry-run", "--entity", "me", "--project", "proj")
    assert res.exit_code == 0, res.stderr
    spec = json.loads((run / "wandb_report.json").read_text())
    assert spec["project"] == "proj" and spec["entity"] == "me"
    headings = [b["text"] for b in spec["blocks"] if b["type"] == "H2"]
    assert headings[:6] == ["Training loss curves", "Similarity metrics", "Performance and timing", "Gradient norms",
                            "Validation metrics (the queries every choice was made on)",
                            "Held-out test queries: the model alone, BM25 and the default search"]
    grids = [b for b in spec["blocks"] if b["type"] == "PanelGrid"]
    for g in grids:
        for rs in g["runsets"]:
            assert rs["filters"] == f"Metric(\"ID\") == '{run.name}'" and rs["query"] == ""
    ys = {y for g in grids for p in g["panels"] for y in p.get("y", [])}
    assert {"train/loss", "train/pos_sim", "perf/forward_ms", "train/grad_norm", "val/mrr@10"} <= ys
    bars = [p for g in grids for p in g["panels"] if p["type"] == "BarPlot"]
    assert len(bars) == 1 and {"test/mrr@10", "test/bm25/mrr@10", "test/search/mrr@10"} <= set(bars[0]["metrics"])
    tables = {p.get("table_name") for g in grids for p in g["panels"]}
    assert {"retrieval/results", "data/examples"} <= tables


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--disable-quic"]


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("TWOTOWER_REQUIRE_CHROMIUM"),
                    reason="Chromium is not installed (apt-get install chromium); .ci/run installs it")
def test_report_renders_in_chromium(cli, tiny_pairs, tmp_path):
    assert CHROMIUM, "Chromium is required here (TWOTOWER_REQUIRE_CHROMIUM is set) but not installed"
    assert cli("train", tiny_pairs, *SMALL, "--runs-dir", tmp_path / "runs").exit_code == 0
    report = (tmp_path / "runs" / "latest").resolve() / "report.html"
    profile = tmp_path / "profile"
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2400",
                    f"--screenshot={shot}", report.as_uri()], check=True, capture_output=True, timeout=120)
    # measure the rendered charts: a copy of the page with a probe script, DOM dumped after it ran
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", """<script>
const s=[...document.querySelectorAll('svg')].map(e=>{const r=e.getBoundingClientRect();return [r.width,r.height]});
const p=document.createElement('pre');p.id='probe';p.textContent=JSON.stringify(s);document.body.appendChild(p);
</script></body>"""))
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}2", "--window-size=1280,2400",
                          "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    sizes = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom).group(1))
    assert len(sizes) >= 8 and all(w > 200 and h > 100 for w, h in sizes), sizes
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[0] > 1000 and img[..., :3].std() > 0.05  # not a blank page
    non_white = (img[..., :3].mean(-1) < 0.9).mean()
    assert non_white > 0.02
