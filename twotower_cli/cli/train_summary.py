"""What `twotower train` prints when a run is finished: the best epoch, the choices made on validation, the
figures on the test queries, and what was written. Results go to stdout."""

from __future__ import annotations

import sys

from twotower_cli.cli.console import note, out


def warn_if_weak(summary, cfg) -> None:
    """Say so when the model learned little: validation near zero, or far below BM25 on the same queries."""
    best = summary.best.get("val/mrr@10")
    test = summary.test
    if test:
        dense, bm25, where = test.get("test/mrr@10"), test.get("test/bm25/mrr@10"), "test"
    else:
        scores = summary.search.get("val_mrr@10", {})
        dense, bm25, where = scores.get("1.0"), scores.get("0.0"), "validation"
    cause = ("the character encoders (cnn, mean) learn little from a few thousand pairs: use the default ngram "
             "encoder, or far more pairs" if cfg.model.encoder != "ngram"
             else "too few or too noisy pairs (check with twotower validate-data)")
    if best is not None and best < 0.02:
        note(f"[yellow]warning:[/] validation stayed near zero (best val/mrr@10 {best:.4f}): the model learned "
             f"almost nothing. Likely cause: {cause}")
    elif dense is not None and bm25 is not None and dense < 0.8 * bm25:
        mode = summary.search.get("mode")
        note(f"[yellow]warning:[/] on the {where} queries the model alone (mrr@10 {dense:.4f}) is well below "
             f"BM25 ({bm25:.4f}); the default search is {mode}, which "
             + ("uses BM25" if mode != "dense" else "does not use BM25") + f". Likely cause: {cause}")


def show_summary(summary) -> None:
    from rich.table import Table

    if summary.best and any(k.startswith("val/") for k in summary.best):
        table = Table(title=f"Best epoch {summary.best_epoch}, by val/mrr@10 on the validation queries (every "
                            "choice was made on them)", title_justify="left")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in summary.best.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        out.print(table)
    elif summary.best_epoch == 0:
        out.print("the base model as it is (--epochs 0: no training)", highlight=False)
    else:
        out.print(f"kept epoch {summary.best_epoch}, the one with the lowest training loss (no validation split)",
                  highlight=False)
    lexical = lexical_choice(summary.run_dir)
    if lexical:
        out.print(lexical, highlight=False)
    s = summary.search
    if s:
        out.print(f"default search: {s['mode']}" + (f" (dense weight {s['hybrid_weight']:g})" if s["mode"] == "hybrid"
                                                    else "") + f"; {s.get('reason', '')}", highlight=False)
    show_test(summary)
    paths = Table(title="Written", title_justify="left", show_header=False)
    for k, v in summary.written.items():
        paths.add_row(k, shown(v))
    paths.add_row("size", f"{summary.size_bytes / 2**20:,.1f} MiB (run folder)")
    out.print(paths)
    runs = summary.run_dir.parent
    where = "" if shown(runs) == "runs" else f" --runs-dir {shown(runs)}"
    out.print(f"search it: twotower search \"your query\"{where}", highlight=False)
    sys.stdout.flush()


def show_test(summary) -> None:
    """The run's figures: measured on the test queries, which neither training nor any choice saw."""
    from rich.table import Table

    t = summary.test
    if not t:
        out.print("no test split (too few queries, or --test-fraction 0): the validation figures above chose the "
                  "run, so they flatter it", highlight=False)
        return
    n = json_of(summary.run_dir / "run.json").get("test_queries", 0)
    mode = summary.search.get("mode", "dense")
    table = Table(title=f"On {n:,} test queries, held out from training and from every choice",
                  title_justify="left")
    table.add_column("system")
    for name in ("mrr@10", "ndcg@10", "recall@10", "recall@100"):
        table.add_column(name, justify="right")
    for label, prefix in (("the model alone", "test/"), ("BM25", "test/bm25/"),
                          (f"the default search ({mode}) *", "test/search/")):
        table.add_row(label, *(f"{t.get(prefix + m, 0.0):.4f}" for m in ("mrr@10", "ndcg@10", "recall@10",
                                                                          "recall@100")))
    out.print(table)


def json_of(path) -> dict:
    import json

    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def lexical_choice(run_dir) -> str:
    """What training chose for the lexical half on validation (`training.choices`), in a line; "" for none."""
    import json

    from twotower_cli.model.config import ModelConfig
    from twotower_cli.training.choices import TIE  # (torch is loaded: training just ran)

    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    lex, model = config.get("lexical_choice"), config.get("model", {})
    if not lex:
        return ""
    line = f"lexical half: weight {lex['weight']:g} in the model's score"
    lead = lex.get("lead_val_mrr@10")
    if lead:
        b = lex.get("lead_weight", 0.0)
        without = lead.get("0.0", 0.0)
        cfg = ModelConfig(**model)
        n = min(cfg.lead_characters, cfg.lexical_length)  # (no more than the exact half reads)
        line += (f"; a document's first {n} characters count again at weight {b:g} "
                 f"(val/mrr@10 {lead.get(str(b), 0.0):.4f}, without {without:.4f})" if b else
                 f"; a document's opening counts once (counting it again did not gain more than {TIE:g} on "
                 "validation)")
    return line


def shown(path) -> str:
    """A path relative to the working folder when it is inside it (a resumed run's are absolute), else as is."""
    from pathlib import Path

    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)
