import json
import subprocess
import sys

from tests.conftest import write


def test_help_lists_every_command_without_heavy_imports():
    code = ("import sys; from twotower_cli.cli.main import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['--help']); print(r.stdout); "
            "print('HEAVY', [m for m in ('torch', 'polars', 'wandb') if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for cmd in ("train", "search", "index", "evaluate", "report", "validate-data", "inspect-vocab", "config"):
        assert cmd in res.stdout
    assert "HEAVY []" in res.stdout


def test_version_and_short_help(cli):
    assert cli("--version").stdout.startswith("twotower ")
    assert "Usage" in cli("-h").stdout
    assert cli("train", "-h").exit_code == 0


def test_help_keeps_the_values_a_flag_takes_as_typed():
    from twotower_cli.cli.options import setting

    assert setting("train", "device", "--device").help.startswith("cpu, cuda, cuda:N or auto.")
    assert setting("train", "loss", "--loss").help.startswith("infonce (in-batch softmax)")
    assert setting("train", "learning_rate", "--lr").help.startswith("Peak learning rate (")  # a sentence


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "twotower_cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "twotower" in res.stdout


def test_validate_data_on_sample(cli, sample_df, tmp_path):
    res = cli("validate-data", "--json", str(tmp_path / ".." / "x") if False else _sample())
    doc = json.loads(res.stdout)
    assert res.exit_code == 0 and doc["ok"] and doc["rows"] == sample_df.height
    assert doc["labels"]["positive"] == 2000
    assert set(doc["columns"]["document"]) >= {"p50", "p95", "max", "truncated", "nulls", "empty", "control"}


def _sample():
    from tests.conftest import SAMPLE

    return str(SAMPLE)


def test_validate_data_findings_and_strict(cli, tmp_path):
    p = write(tmp_path / "w.tsv", "a\tdoc one\t1\na\tdoc one\t1\nb\t \t0\n")
    res = cli("validate-data", p)
    assert res.exit_code == 0 and "duplicate rows" in res.stdout
    res = cli("validate-data", p, "--strict")
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and "w.tsv" in res.stderr
    bad = write(tmp_path / "bad.tsv", "a\tb\t2\n")
    res = cli("validate-data", bad, "--json")
    assert res.exit_code == 1 and not json.loads(res.stdout)["ok"]
    assert "not 0/1" in res.stderr and "Traceback" not in res.stderr


def test_validate_data_errors_are_one_line(cli, tmp_path):
    for args in (["missing.tsv"], [str(tmp_path)], [str(write(tmp_path / "e.tsv", ""))]):
        res = cli("validate-data", *args)
        assert res.exit_code == 1
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr


def test_inspect_vocab_without_run_needs_data(cli):
    res = cli("inspect-vocab")
    assert res.exit_code == 1 and "train one first" in res.stderr  # the same as search and report


def test_inspect_vocab_builds_from_data(cli, tmp_path, monkeypatch):
    p = write(tmp_path / "a.tsv", "hello world\tthe doc\t1\nzz\tyy\t0\n")
    res = cli("inspect-vocab", "--data", p, "--json", "--top", "0")
    doc = json.loads(res.stdout)
    shown = {c["char"]: c for c in doc["chars"]}
    assert shown[" "]["shown"] == "␠" and shown["o"]["name"] == "LATIN SMALL LETTER O"
    assert "w" not in shown  # seen once: below the default min_freq of 2
    assert doc["data"]["oov_rate"] > 0 and "w" in [u["char"] for u in doc["data"]["top_unknown"]]
    monkeypatch.setenv("TWOTOWER_VOCAB_MIN_FREQ", "1")
    doc = json.loads(cli("inspect-vocab", "--data", p, "--json").stdout)
    assert doc["data"]["oov_rate"] == 0.0
    res = cli("inspect-vocab", "--data", p)
    assert res.exit_code == 0 and "SPACE" in res.stdout


def test_debug_variable_shows_traceback(cli, monkeypatch):
    from twotower_cli.errors import DataError

    res = cli("validate-data", "missing.tsv")
    assert isinstance(res.exception, SystemExit) and res.stderr.startswith("error: missing.tsv")
    monkeypatch.setenv("TWOTOWER_DEBUG", "1")
    res = cli("validate-data", "missing.tsv")
    assert isinstance(res.exception, DataError), res.exception  # raised as is: the traceback is shown
