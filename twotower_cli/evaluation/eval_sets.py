"""Evaluation folders: queries, a corpus and relevance judgements, in BEIR's layout or a Parquet layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from twotower_cli.errors import DataError


@dataclass
class EvalSet:
    path: Path
    query_ids: list[str]
    queries: pl.Series
    doc_ids: list[str]
    documents: pl.Series
    qrels: list[dict[int, float]]  # per query row: {document row: grade}


def read_jsonl(path: Path) -> pl.DataFrame:
    try:
        return pl.read_ndjson(path, infer_schema_length=None)
    except Exception as exc:
        raise DataError(f"{path}: cannot read JSON lines ({str(exc).splitlines()[0] if str(exc) else exc})") from None


def need(df: pl.DataFrame, cols: list[str], path: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(df.columns)})")


def load_eval(folder: str | Path, split: str = "test") -> EvalSet:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; expected an evaluation folder (BEIR layout: corpus.jsonl, "
                        "queries.jsonl, qrels/test.tsv; or queries/corpus/qrels .parquet)")
    if (folder / "corpus.parquet").exists():
        files = {n: folder / f"{n}.parquet" for n in ("queries", "corpus", "qrels")}
        for p in files.values():
            if not p.exists():
                raise DataError(f"{p}: missing; the Parquet layout needs queries, corpus and qrels .parquet")
        try:
            q, c, r = (pl.read_parquet(files[n]) for n in ("queries", "corpus", "qrels"))
        except Exception as exc:
            raise DataError(f"{folder}: cannot read Parquet ({str(exc).splitlines()[0]})") from None
        need(q, ["query_id", "query"], files["queries"])
        need(c, ["doc_id", "document"], files["corpus"])
        need(r, ["query_id", "doc_id"], files["qrels"])
        q = q.select(pl.col("query_id").cast(pl.String), pl.col("query").alias("text"))
        c = c.select(pl.col("doc_id").cast(pl.String), pl.col("document").alias("text"))
        score = pl.col("score").cast(pl.Float64) if "score" in r.columns else pl.lit(1.0)
        r = r.select(pl.col("query_id").cast(pl.String), pl.col("doc_id").cast(pl.String), score.alias("score"))
    elif (folder / "corpus.jsonl").exists():
        c = read_jsonl(folder / "corpus.jsonl")
        q = read_jsonl(folder / "queries.jsonl")
        qrels_path = folder / "qrels" / f"{split}.tsv"
        if not qrels_path.exists():
            raise DataError(f"{qrels_path}: missing; BEIR folders keep relevance judgements in qrels/{split}.tsv")
        need(c, ["_id", "text"], folder / "corpus.jsonl")
        need(q, ["_id", "text"], folder / "queries.jsonl")
        title = pl.col("title").fill_null("") if "title" in c.columns else pl.lit("")
        c = c.select(pl.col("_id").cast(pl.String).alias("doc_id"),
                     pl.when(title.str.len_chars() > 0).then(title + " " + pl.col("text")).otherwise(pl.col("text"))
                     .alias("text"))
        q = q.select(pl.col("_id").cast(pl.String).alias("query_id"), pl.col("text"))
        r = pl.read_csv(qrels_path, separator="\t", infer_schema=False)
        need(r, ["query-id", "corpus-id"], qrels_path)
        r = r.select(pl.col("query-id").alias("query_id"), pl.col("corpus-id").alias("doc_id"),
                     (pl.col("score").cast(pl.Float64) if "score" in r.columns else pl.lit(1.0)).alias("score"))
    else:
        raise DataError(f"{folder}: no corpus.parquet or corpus.jsonl; expected the BEIR or the Parquet layout")

    c = c.unique("doc_id", keep="first", maintain_order=True)
    doc_row = {d: i for i, d in enumerate(c["doc_id"].to_list())}
    q = q.filter(pl.col("query_id").is_in(r["query_id"].unique().implode()))
    q_row = {d: i for i, d in enumerate(q["query_id"].to_list())}
    qrels: list[dict[int, float]] = [{} for _ in range(len(q_row))]
    for qid, did, s in r.iter_rows():
        if qid in q_row and did in doc_row:
            qrels[q_row[qid]][doc_row[did]] = float(s)
    if not q_row:
        raise DataError(f"{folder}: no query has relevance judgements; check that qrels ids match the queries")
    return EvalSet(folder, q["query_id"].to_list(), q["text"].str.normalize("NFKC"), c["doc_id"].to_list(),
                   c["text"].fill_null("").str.normalize("NFKC"), qrels)
