"""`validate-data`: everything worth knowing about a pairs file before training on it.

Each finding is an error (no model can be trained as is) or a warning (usable, but probably not what you want).
All statistics are Polars expressions over the whole frame: the Debian set (112k rows) takes well under a second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import polars as pl

from twotower_cli.data.pairs import Pairs

# Characters that are invisible or control codes in text (tab and newline are ordinary in documents).
CONTROL_PATTERN = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff\ufffd]"
MANY_QUERIES = 5  # a document that is the positive of at least this many queries is reported


@dataclass
class Finding:
    level: str  # "error", "warning" or "info" (a note: never fails --strict)
    check: str
    message: str
    count: int = 0


@dataclass
class Report:
    path: str
    rows: int
    schema: dict[str, str]
    columns: dict[str, dict] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = not self.errors
        return d


PLURAL = {"query": "queries", "document": "documents", "row": "rows", "label": "labels"}


def count(n: int, noun: str) -> str:
    return f"{n:,} {noun if n == 1 else PLURAL.get(noun, noun + 's')}"


def have(n: int) -> str:
    return "has" if n == 1 else "have"


def pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "0%"


def validate(pairs: Pairs, max_query_length: int, max_document_length: int) -> Report:
    df = pairs.df
    n = df.height
    rep = Report(str(pairs.path), n, {c: str(t) for c, t in df.schema.items()})
    add = rep.findings.append

    limits = {"query": max_query_length, "document": max_document_length}
    for col in ("query", "document"):
        s = pl.col(col)
        stats = df.select(
            nulls=s.is_null().sum(),
            empty=(s.str.len_chars() == 0).sum(),
            blank=((s.str.strip_chars().str.len_chars() == 0) & (s.str.len_chars() > 0)).sum(),
            p50=s.str.len_chars().quantile(0.5, "nearest"),
            p95=s.str.len_chars().quantile(0.95, "nearest"),
            max=s.str.len_chars().max(),
            truncated=(s.str.len_chars() > limits[col]).sum(),
            control=s.str.contains(CONTROL_PATTERN).sum(),
        ).row(0, named=True)
        stats = {k: int(v or 0) for k, v in stats.items()}
        stats["max_length"] = limits[col]
        rep.columns[col] = stats
        if stats["nulls"]:
            k = stats["nulls"]
            add(Finding("warning", f"{col}: nulls", f"{count(k, 'row')} {have(k)} no {col} ({pct(k, n)}); "
                        "they will be dropped", k))
        if stats["empty"] or stats["blank"]:
            k = stats["empty"] + stats["blank"]
            add(Finding("warning", f"{col}: empty", f"{count(k, 'row')} {have(k)} an empty or whitespace-only {col}; "
                        "they will be dropped", k))
        if stats["truncated"]:
            # a model setting, not a defect of the data: a note, never a --strict failure
            add(Finding("info", f"{col}: truncation",
                        f"{pct(stats['truncated'], n)} of {PLURAL[col]} are longer than max_{col}_length "
                        f"{limits[col]} (p95 {stats['p95']}, max {stats['max']}): "
                        + ("the learned half of the model reads no further (its exact lexical half reads up to "
                           "lexical_document_length)" if col == "document" else "the model reads no further")
                        + f" (train --max-{col}-length changes it)", stats["truncated"]))
        if stats["control"]:
            add(Finding("warning", f"{col}: control characters",
                        f"{count(stats['control'], col)} contain{'s' if stats['control'] == 1 else ''} control or "
                        "invisible characters", stats["control"]))

    if pairs.n_bad_labels:
        r, v = pairs.bad_labels[0]
        add(Finding("error", "label: values", f"{pairs.n_bad_labels} labels are not 0/1 (first at "
                    f"{pairs.where(r)}: {v!r}); use 1 for relevant, 0 for negative", pairs.n_bad_labels))
    pos = int((df["label"] == 1).sum())
    neg = int((df["label"] == 0).sum())
    rep.labels = {"positive": pos, "negative": neg, "invalid": pairs.n_bad_labels}
    if not pairs.has_label:
        add(Finding("info", "label: absent", "no label column: every row is taken as a relevant pair"))
    usable = df.filter((pl.col("label") == 1) & (pl.col("query").str.strip_chars().str.len_chars() > 0)
                       & (pl.col("document").str.strip_chars().str.len_chars() > 0)).height
    if pos == 0:
        add(Finding("error", "label: no positives", "no row has label 1; training needs relevant pairs"))
    elif usable == 0:
        add(Finding("error", "label: no usable positives",
                    "no positive pair has both a non-empty query and document; training needs relevant pairs"))
    elif neg and (neg / (pos + neg) > 0.9):
        add(Finding("warning", "label: balance", f"only {pct(pos, pos + neg)} of rows are positive"))

    dupes = n - df.unique().height
    if dupes:
        add(Finding("warning", "duplicate rows",
                    f"{count(dupes, 'row')} repeat{'s' if dupes == 1 else ''} an earlier row exactly", dupes))

    good = df.filter(pl.col("query").is_not_null())
    no_pos = good.group_by("query").agg((pl.col("label") == 1).any().alias("has")).filter(~pl.col("has")).height
    if no_pos:
        add(Finding("warning", "queries without positive",
                    f"{count(no_pos, 'query')} {have(no_pos)} no relevant document; they only serve as negatives' "
                    "anchors", no_pos))

    popular = (df.filter(pl.col("label") == 1).group_by("document").agg(pl.col("query").n_unique().alias("q"))
               .filter(pl.col("q") >= MANY_QUERIES).sort("q", descending=True))
    if popular.height:
        top = popular.row(0, named=True)
        add(Finding("warning", "documents positive for many queries",
                    f"{count(popular.height, 'document')} {'is' if popular.height == 1 else 'are'} the positive of "
                    f"≥{MANY_QUERIES} queries (top: {top['q']} queries, '{short(top['document'])}'); in-batch "
                    "negatives will often be false negatives",
                    popular.height))
    return rep


def short(text: str, n: int = 40) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"
