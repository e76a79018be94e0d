"""`validate-data` and `inspect-vocab`: look at the data and at the characters the model reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from twotower_cli.cli.common import command, settings
from twotower_cli.cli.console import out, plural, print_json
from twotower_cli.cli.main import app
from twotower_cli.cli.options import (
    ConfigOpt,
    DataArg,
    DocumentColOpt,
    JsonOpt,
    LabelColOpt,
    QueryColOpt,
    RunOpt,
    RunsDirOpt,
)

LEVEL_STYLE = {"error": "bold red", "warning": "yellow", "info": "dim"}


def data_overrides(query_col, document_col, label_col) -> dict:
    return {("data", "query_col"): query_col, ("data", "document_col"): document_col,
            ("data", "label_col"): label_col}


@command(app, "validate-data", short_help="Check a pairs file before training on it",
         help="Check a pairs file: schema, labels, duplicates, lengths, odd characters.")
def validate_data(
    data: DataArg,
    json_out: JsonOpt = False,
    strict: Annotated[bool, typer.Option(
        "--strict", metavar="", help="Treat warnings as errors (exit 1).")] = False,
    query_col: QueryColOpt = None,
    document_col: DocumentColOpt = None,
    label_col: LabelColOpt = None,
    config: ConfigOpt = None,
) -> None:
    from twotower_cli.data.pairs import load_pairs
    from twotower_cli.data.validate import validate

    cfg = settings(config, data_overrides(query_col, document_col, label_col))
    pairs = load_pairs(data, cfg.data.query_col, cfg.data.document_col, cfg.data.label_col)
    rep = validate(pairs, cfg.data.max_query_length, cfg.data.max_document_length)
    failed = bool(rep.errors) or (strict and bool(rep.warnings))
    if json_out:
        doc = rep.to_dict()
        doc["ok"] = not failed
        print_json(doc)
    else:
        show_report(rep)
    if failed:
        first = (rep.errors or rep.warnings)[0]
        from twotower_cli.cli.console import error_line

        error_line(f"{data}: {first.check}: {first.message}"
                   + (f" (+{len(rep.errors) + len(rep.warnings) - 1} more findings above)"
                      if len(rep.errors) + len(rep.warnings) > 1 else ""))
        raise typer.Exit(1)


def show_report(rep) -> None:
    from rich.table import Table

    # narrow enough for an 80-column terminal: a column's type beside its name, its lengths in one cell
    from rich import box

    summary = Table(title=f"{rep.path}: {plural(rep.rows, 'row')}; lengths in characters", title_justify="left",
                    box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("column", "nulls", "empty", "p50", "p95", "max", "reads", "longer", "control"):
        summary.add_column(col, justify="left" if col == "column" else "right", no_wrap=True)
    for name, st in rep.columns.items():
        share = f"{st['truncated']:,} ({100 * st['truncated'] / rep.rows:.1f}%)" if rep.rows else "-"
        kind = "" if rep.schema[name] in ("String", "Utf8") else f" ({rep.schema[name]})"  # (text is the rule)
        summary.add_row(f"{name}{kind}", str(st["nulls"]), str(st["empty"] + st["blank"]),
                        f"{st['p50']:,}", f"{st['p95']:,}", f"{st['max']:,}", f"{st['max_length']:,}", share,
                        str(st["control"]))
    out.print(summary)
    lab = rep.labels
    labels = Table(title="labels", title_justify="left")
    for col in ("positive (1)", "negative (0)", "invalid"):
        labels.add_column(col, justify="right")
    labels.add_row(f"{lab['positive']:,}", f"{lab['negative']:,}", f"{lab['invalid']:,}")
    out.print(labels)
    if not rep.findings:
        out.print("[green]No problems found.[/]")
        return
    table = Table(title="Findings", title_justify="left")
    table.add_column("level")
    table.add_column("check")
    table.add_column("finding")
    for f in sorted(rep.findings, key=lambda f: ["error", "warning", "info"].index(f.level)):
        table.add_row(f"[{LEVEL_STYLE[f.level]}]{f.level}[/]", f.check, f.message)
    out.print(table)
    verdict = "[bold red]not usable[/]" if rep.errors else "[green]usable[/]"
    out.print(f"{verdict}: {plural(len(rep.errors), 'error')}, {plural(len(rep.warnings), 'warning')}")


@command(app, "inspect-vocab", short_help="A run's vocabulary (and tokenizer), or a file's",
         help="Show the character vocabulary of a run (or the one a file would build).")
def inspect_vocab(
    run: RunOpt = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", readable=False, metavar="FILE", show_default=False,
        help="Pairs file: its out-of-vocabulary rate, or the vocabulary training would build from it when there is "
             "no run.")] = None,
    top: Annotated[int, typer.Option("--top", min=0, metavar="N", help="Characters to list (0: all).")] = 40,
    json_out: JsonOpt = False,
    runs_dir: RunsDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    import polars as pl

    from twotower_cli.data.pairs import load_pairs
    from twotower_cli.data.vocab import Vocab, describe, visible
    from twotower_cli.errors import ArtifactError
    from twotower_cli.runs import resolve_run

    cfg = settings(config, {("train", "runs_dir"): str(runs_dir) if runs_dir else None})
    source = vocab = None
    if run or data is None:  # a run's vocabulary: a missing run is the same error (exit 1) as for search
        run_dir = resolve_run(cfg.train.runs_dir, run)
        vocab = Vocab.load(run_dir / "vocab.json")
        source = f"run {run_dir.name}"
    else:  # --data alone: the latest run's vocabulary when there is one, else the one training would build
        try:
            run_dir = resolve_run(cfg.train.runs_dir, None)
        except ArtifactError:
            run_dir = None
        if run_dir is not None:
            vocab = Vocab.load(run_dir / "vocab.json")
            source = f"run {run_dir.name}"
    pairs = load_pairs(data, cfg.data.query_col, cfg.data.document_col, cfg.data.label_col) if data else None
    if vocab is None:
        vocab = Vocab.build([pairs.df["query"], pairs.df["document"]], cfg.vocab.min_freq, cfg.vocab.max_size,
                            cfg.vocab.lowercase)
        source = f"built from {data} (as training would)"
    total = sum(vocab.counts) or 1
    rows = []
    for i, (ch, n) in enumerate(zip(vocab.chars, vocab.counts)):
        name, cat = describe(ch)
        rows.append({"id": i + 2, "char": ch, "shown": visible(ch), "name": name, "category": cat, "count": n,
                     "share": n / total})
    doc = {"source": source, "size": len(vocab), "lowercase": vocab.lowercase, "chars": rows[: top or None]}
    tokenizer = tokenizer_section(run_dir if source and source.startswith("run") else None, pairs, top)
    if tokenizer:
        doc["tokenizer"] = tokenizer
    if pairs is not None:
        text = pl.concat([pairs.df["query"], pairs.df["document"]])
        rate, unknown = vocab.unknown_rate(text)
        doc["data"] = {"path": str(data), "oov_rate": rate,
                       "top_unknown": [{"char": c, "shown": visible(c), "name": describe(c)[0], "count": k}
                                       for c, k in unknown]}
    if json_out:
        print_json(doc)
        return
    from rich.table import Table

    table = Table(title=f"Vocabulary: {source}", title_justify="left")
    for col, just in (("id", "right"), ("char", "center"), ("unicode name", "left"), ("cat", "left"),
                      ("count", "right"), ("share", "right")):
        table.add_column(col, justify=just)
    table.add_row("0", "", "(padding)", "", "", "", style="dim")
    table.add_row("1", "�", "(unknown character)", "", "", "", style="dim")
    for r in doc["chars"]:
        table.add_row(str(r["id"]), r["shown"], r["name"], r["category"], f"{r['count']:,}", f"{100 * r['share']:.2f}%")
    out.print(table)
    shown = len(doc["chars"])
    out.print(f"size {len(vocab)} (2 special + {len(vocab.chars)} characters, {shown} shown), "
              f"lowercase={vocab.lowercase}, {total:,} characters counted")
    if pairs is not None:
        d = doc["data"]
        unk = ", ".join(f"{u['shown']} ({u['count']:,})" for u in d["top_unknown"][:10]) or "none"
        out.print(f"{data}: out-of-vocabulary rate {100 * d['oov_rate']:.3f}%; most frequent unknown: {unk}")
    if tokenizer:
        show_tokenizer(tokenizer, data)


def tokenizer_section(run_dir, pairs, top: int) -> dict | None:
    """A base-model run's tokenizer (its encoder folder), with a file's token statistics when given."""
    import json

    if run_dir is None or not (run_dir / "encoder").is_dir():
        return None
    from twotower_cli.model.transformer import tokenizer_report

    model = json.loads((run_dir / "config.json").read_text()).get("model", {})
    texts = None
    if pairs is not None:
        texts = pairs.df["document"].head(20000).to_list()
    return tokenizer_report(run_dir / "encoder", texts, int(model.get("max_document_tokens", 0)), top)


def show_tokenizer(t: dict, data) -> None:
    from rich.table import Table

    table = Table(title=f"Tokenizer of the encoder ({t['size']:,} tokens; special: {', '.join(t['special'])})",
                  title_justify="left")
    for col, just in (("id", "right"), ("token", "left"), ("count", "right")):
        table.add_column(col, justify=just)
    from rich.markup import escape

    for r in t["tokens"]:
        table.add_row(str(r["id"]), escape(r["token"]), "" if r["count"] is None else f"{r['count']:,}")
    out.print(table)
    if "data" in t:
        d = t["data"]
        out.print(f"{data}: {100 * d['unknown_rate']:.3f}% of tokens are {t['unknown_token']}; documents have "
                  f"{d['mean_tokens']:.0f} tokens on average, {100 * d['cut_rate']:.1f}% are cut at "
                  f"{t['max_tokens']} (the exact lexical half reads past the cut)", highlight=False)

