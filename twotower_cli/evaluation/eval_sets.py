"""Evaluation folders: queries, a corpus and relevance judgements, in BEIR's layout or a Parquet layout.

Edge cases are decided as trec_eval decides them, and reported in `notes`:
- a judged query whose judgements are all grade 0 has no relevant document: it is scored 0 (not skipped);
- a relevant document missing from the corpus can never be retrieved: it still counts as relevant (Recall 0.5 for a
  query with one of its two relevant documents missing and the other found), so the metrics are not inflated;
- queries without any judgement are not evaluated; duplicate query or document ids keep their first row;
- qrels rows without ids or score, or naming an unknown query, are dropped; a row repeated counts once; a pair judged
  twice keeps its first judgement; a grade that is not finite is an error (each of these said, with its count);
- queries or documents without text are kept as empty text (said in a note).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from twotower_cli.errors import DataError


@dataclass
class EvalSet:
    path: Path
    query_ids: list[str]
    queries: pl.Series
    doc_ids: list[str]
    documents: pl.Series | None  # None when loaded without texts (the corpus is searched in an index built before)
    qrels: list[dict[int, float]]  # per query row: {document row: grade}; rows <= -2 are relevant but missing
    notes: list[str] = field(default_factory=list)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_file(path: Path, kind: str, columns: list[str] | None = None) -> pl.DataFrame:
    """One file of the folder as a frame; every way it can be unusable is a DataError naming it."""
    if not path.exists():
        raise DataError(f"{path}: missing; an evaluation folder needs queries, corpus and qrels files")
    if not path.is_file():
        raise DataError(f"{path}: is not a file; replace it with the {kind} file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty; it should hold the {kind}")
    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path, columns=columns)
        if path.suffix == ".jsonl":
            return pl.read_ndjson(path, infer_schema_length=None)
        return pl.read_csv(path, separator="\t", infer_schema=False, quote_char=None)
    except Exception as exc:
        raise DataError(f"{path}: cannot read the {kind} ({first_line(exc)})") from None


def need(df: pl.DataFrame, cols: list[str], path: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(df.columns) or 'none'})")


def plain(df: pl.DataFrame, cols: list[str], path: Path) -> None:
    """Ids and texts are strings or numbers: a list or an object in their place is named, never cast."""
    for col in cols:
        dtype = df.schema.get(col)
        if dtype is not None and not (dtype == pl.String or dtype.is_numeric() or dtype in (pl.Boolean, pl.Null)):
            raise DataError(f"{path}: column '{col}' holds {dtype} values, expected text or numbers; give one "
                            "string a row")


def load_eval(folder: str | Path, split: str = "test", texts: bool = True) -> EvalSet:
    """``texts`` False: the corpus's ids only (a Parquet corpus's text column is not read)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; expected an evaluation folder (BEIR layout: corpus.jsonl, "
                        "queries.jsonl, qrels/test.tsv; or queries/corpus/qrels .parquet)")
    if (folder / "corpus.parquet").exists():
        files = {n: folder / f"{n}.parquet" for n in ("queries", "corpus", "qrels")}
        q, r = read_file(files["queries"], "queries"), read_file(files["qrels"], "qrels")
        c = read_file(files["corpus"], "corpus", None if texts else ["doc_id"])
        need(q, ["query_id", "query"], files["queries"])
        need(c, ["doc_id", "document"] if texts else ["doc_id"], files["corpus"])
        need(r, ["query_id", "doc_id"], files["qrels"])
        plain(q, ["query_id", "query"], files["queries"])
        plain(c, ["doc_id", "document"] if texts else ["doc_id"], files["corpus"])
        plain(r, ["query_id", "doc_id"], files["qrels"])
        q = q.select(pl.col("query_id").cast(pl.String), pl.col("query").cast(pl.String).alias("text"))
        c = c.select(pl.col("doc_id").cast(pl.String),
                     (pl.col("document") if texts else pl.lit("")).cast(pl.String).alias("text"))
        qrels_path = files["qrels"]
        score = pl.col("score") if "score" in r.columns else pl.lit(1.0)
        r = r.select(pl.col("query_id").cast(pl.String), pl.col("doc_id").cast(pl.String), score.alias("score"))
    elif (folder / "corpus.jsonl").exists():
        c = read_file(folder / "corpus.jsonl", "corpus")
        q = read_file(folder / "queries.jsonl", "queries")
        qrels_path = folder / "qrels" / f"{split}.tsv"
        r = read_file(qrels_path, "relevance judgements")
        need(c, ["_id", "text"], folder / "corpus.jsonl")
        need(q, ["_id", "text"], folder / "queries.jsonl")
        need(r, ["query-id", "corpus-id"], qrels_path)
        plain(c, ["_id", "text", "title"], folder / "corpus.jsonl")
        plain(q, ["_id", "text"], folder / "queries.jsonl")
        title = pl.col("title").cast(pl.String).fill_null("") if "title" in c.columns else pl.lit("")
        text = pl.col("text").cast(pl.String)
        c = c.select(pl.col("_id").cast(pl.String).alias("doc_id"),
                     pl.when(title.str.len_chars() > 0).then(title + " " + text).otherwise(text).alias("text"))
        q = q.select(pl.col("_id").cast(pl.String).alias("query_id"), pl.col("text").cast(pl.String))
        r = r.select(pl.col("query-id").alias("query_id"), pl.col("corpus-id").alias("doc_id"),
                     (pl.col("score") if "score" in r.columns else pl.lit(1.0)).alias("score"))
    else:
        raise DataError(f"{folder}: no corpus.parquet or corpus.jsonl; expected the BEIR or the Parquet layout")
    try:
        r = r.with_columns(pl.col("score").cast(pl.Float64))
    except Exception:
        raise DataError(f"{qrels_path}: relevance scores must be numbers") from None
    bad = r.with_row_index().filter(pl.col("score").is_nan() | pl.col("score").is_infinite())
    if bad.height:
        raise DataError(f"{qrels_path}: {bad.height} relevance score(s) are not finite (the first on data row "
                        f"{bad['index'][0] + 1}: {bad['score'][0]}); give each judgement a finite grade")
    notes = []
    for frame, col, what in ((q, "query_id", "queries"), (c, "doc_id", "documents")):
        nulls = frame[col].null_count()
        if nulls:
            notes.append(f"{nulls} {what} have no id: dropped")
    q, c = q.filter(pl.col("query_id").is_not_null()), c.filter(pl.col("doc_id").is_not_null())
    for frame, col, what in ((q, "query_id", "query"), (c, "doc_id", "document")):
        dup = frame.height - frame[col].n_unique()
        if dup:
            notes.append(f"{dup} duplicate {what} ids: the first row of each is used")
    q = q.unique("query_id", keep="first", maintain_order=True)
    c = c.unique("doc_id", keep="first", maintain_order=True)
    for frame, what in ((q, "queries"), (c, "documents")) if texts else ((q, "queries"),):
        empty = frame["text"].is_null().sum() + (frame["text"].str.strip_chars() == "").sum()
        if empty:
            notes.append(f"{empty} {what} have no text (null or blank): they are kept, as empty text")
    doc_row = {d: i for i, d in enumerate(c["doc_id"].to_list())}
    q = q.filter(pl.col("query_id").is_in(r["query_id"].unique().implode()))
    q_row = {d: i for i, d in enumerate(q["query_id"].to_list())}
    if not q_row:
        raise DataError(f"{qrels_path}: no judged query is in the queries file; check that the qrels ids match "
                        "the queries")
    qrels: list[dict[int, float]] = [{} for _ in range(len(q_row))]
    missing = unknown = null = conflicts = repeats = 0
    seen: set[tuple[str, str, float]] = set()
    missing_pairs: set[tuple[str, str]] = set()
    for qid, did, s in r.iter_rows():
        if qid is None or did is None or s is None:
            null += 1
            continue
        if qid not in q_row:
            unknown += 1
            continue
        if (qid, did, s) in seen:  # the same row again: one judgement
            repeats += 1
            continue
        seen.add((qid, did, s))
        if did in doc_row:
            row = qrels[q_row[qid]]
            conflicts += doc_row[did] in row and row[doc_row[did]] != float(s)
            row.setdefault(doc_row[did], float(s))  # the first judgement of a pair counts
        elif s > 0 and (qid, did) not in missing_pairs:  # relevant but not in the corpus: counted once, never found
            missing += 1
            missing_pairs.add((qid, did))
            qrels[q_row[qid]][-1 - missing] = float(s)
    if null:
        notes.append(f"{null} qrels rows have no query id, document id or score: dropped")
    if unknown:
        notes.append(f"{unknown} qrels rows name a query id that is not in the queries file: dropped")
    if repeats:
        notes.append(f"{repeats} qrels rows repeat an earlier row exactly: each judgement counts once")
    if conflicts:
        notes.append(f"{conflicts} qrels rows judge a (query, document) pair judged before with another score: "
                     "the first judgement is used")
    if missing:
        notes.append(f"{missing} relevant documents are not in the corpus: they count as relevant and not found")
    unanswerable = sum(1 for rel in qrels if not any(g > 0 for g in rel.values()))
    if unanswerable:
        notes.append(f"{unanswerable} queries have no relevant document (all grades 0): they score 0, as in "
                     "trec_eval")
    return EvalSet(folder, q["query_id"].to_list(), q["text"].fill_null("").str.normalize("NFKC"),
                   c["doc_id"].to_list(), c["text"].fill_null("").str.normalize("NFKC") if texts else None, qrels,
                   notes)
