"""The training set as integer tensors, tokenised once; batches are index slices.

Unique queries and unique documents are tokenised once each. A training example is a positive pair
(query index, document index); label-0 rows become, per query, a list of negatives (CSR arrays) from which one is
sampled per positive each epoch. Mined hard negatives are appended to the same lists. The validation split is by
query: no query appears on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from twotower_cli.data.tokens import TokenTable
from twotower_cli.errors import DataError


def sorted_member(keys: torch.Tensor, sorted_keys: torch.Tensor) -> torch.Tensor:
    """Whether each of ``keys`` is in ``sorted_keys`` (ascending): a binary search per key. torch.isin sorts
    both sides on every call, so masking a batch cost time in proportion to the file's positives (0.14 s a step
    at 0.9M pairs, ~2 s at 10M on this CPU); this costs the batch's keys x log(positives)."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    at = torch.searchsorted(sorted_keys, keys).clamp_(max=sorted_keys.numel() - 1)
    return sorted_keys[at] == keys


@dataclass
class TrainingSet:
    queries: pl.Series  # unique query texts; row i has token row i
    documents: pl.Series  # unique document texts
    q_tokens: TokenTable  # [n_queries, Lq] int32 token rows, indexed like a tensor
    d_tokens: TokenTable  # [n_documents, Ld]
    pos_q: torch.Tensor  # [P] training positives: query index
    pos_d: torch.Tensor  # [P] training positives: document index
    neg_ptr: torch.Tensor  # [n_queries + 1] CSR offsets into neg_doc
    neg_doc: torch.Tensor  # [M] negative document indices
    val_q: torch.Tensor  # [V] validation query indices: what every choice is made on
    val_qrels: list[dict[int, float]]  # per validation query: {document index: 1.0}
    test_q: torch.Tensor  # [T] held out from training and from every choice: the run's reported figures
    test_qrels: list[dict[int, float]]
    # Span pairs: this epoch's extra positives, a span of words cut from a training document (the query) and that
    # document. Positions n_train.. of the epoch's order are span pairs; their query ids follow the real ones.
    span_d: torch.Tensor | None = None  # [S] document index of each span pair
    span_tokens: torch.Tensor | None = None  # [S, Lq] token rows of the spans

    pos_keys: torch.Tensor | None = None  # sorted query x n_documents + document of every known positive

    def is_positive(self, q_ids: torch.Tensor, d_ids: torch.Tensor) -> torch.Tensor:
        """[len(q_ids), len(d_ids)]: whether the file pairs the query with the document as relevant (span pairs'
        queries, numbered after the file's, never are)."""
        keys = q_ids.unsqueeze(1) * self.n_documents + d_ids.unsqueeze(0)
        keys = keys.masked_fill((d_ids < 0).unsqueeze(0), -1)
        return sorted_member(keys, self.pos_keys.to(keys.device))

    def is_pair(self, q_ids: torch.Tensor, d_ids: torch.Tensor) -> torch.Tensor:
        """Element by element: whether (q_ids[i], d_ids[i]) is a known positive."""
        return sorted_member(q_ids * self.n_documents + d_ids, self.pos_keys.to(q_ids.device)) & (d_ids >= 0)

    def held_out_documents(self) -> list[int]:
        """The positives of the validation and test queries: never seen in training (idf, span pairs)."""
        return sorted({d for rel in self.val_qrels + self.test_qrels for d in rel})

    @property
    def n_train(self) -> int:
        return int(self.pos_q.shape[0])

    @property
    def n_queries(self) -> int:
        return len(self.queries)

    @property
    def n_documents(self) -> int:
        return len(self.documents)

    @property
    def n_epoch(self) -> int:
        """Positives in one epoch: the file's training pairs, then the span pairs."""
        return self.n_train + (0 if self.span_d is None else int(self.span_d.shape[0]))

    def to(self, device) -> "TrainingSet":
        for name in ("q_tokens", "d_tokens", "pos_q", "pos_d", "neg_ptr", "neg_doc", "span_d", "span_tokens",
                     "pos_keys"):  # (val_q and test_q stay on the CPU: they index texts)
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self


MIN_FOR_VALIDATION = 10  # fewer queries with a positive: no validation split (the lowest loss picks the epoch)


def build(df: pl.DataFrame, vocab, max_query_length: int, max_document_length: int, val_fraction: float,
          seed: int, eager: bool = True, val_min_queries: int = 0, val_max_queries: int = 0,
          test_fraction: float = 0.0) -> TrainingSet:
    """The training set of a frame of usable pairs held in memory (see `from_rows`)."""
    from twotower_cli.data.stream import rows_in_memory

    return from_rows(rows_in_memory(df), vocab, max_query_length, max_document_length, val_fraction, seed, eager,
                     val_min_queries, val_max_queries, test_fraction)


def from_rows(rows, vocab, max_query_length: int, max_document_length: int, val_fraction: float, seed: int,
              eager: bool = True, val_min_queries: int = 0, val_max_queries: int = 0, test_fraction: float = 0.0,
              grouped: bool = True) -> TrainingSet:
    """The training set of a file's numbered rows (`data.stream.PairRows`). ``eager``: tokenise every text now
    (one process); else only the rows a step uses, when it uses them. ``val_max_queries``: validation holds out
    at most this many queries (0: no cap): the rest of a large file trains. ``test_fraction`` more are held out
    from training and from every choice, for the run's figures (`test_q`). ``grouped``: queries that the query
    tower reads alike (`seen_text`) are held out together, so that none has a twin in training."""
    queries, documents = rows.queries, rows.documents
    nq, nd = len(queries), len(documents)
    qid, did, label = rows.qid, rows.did, rows.label
    pos = label == 1
    keys = qid[pos] * nd + did[pos]
    _, first = np.unique(keys, return_index=True)  # each positive once, in file order
    first.sort()
    pos_q, pos_d = qid[pos][first], did[pos][first]
    candidates = np.unique(pos_q)
    n_val = held_out_size(val_fraction, len(candidates), val_min_queries, val_max_queries)
    n_test = held_out_size(test_fraction, len(candidates), val_min_queries, val_max_queries) if n_val else 0
    if n_val + n_test >= len(candidates):
        raise DataError(f"validation and test would take all {len(candidates)} queries with a positive; "
                        "lower --val-fraction or --test-fraction, or use more data")
    rng = np.random.default_rng(seed)
    if grouped:
        groups = seen_text_groups(queries, candidates, vocab, max_query_length)
        val_q, test_q = held_out(candidates, groups, n_val, n_test, rng)
    else:  # (how runs saved before grouping split: resumed on their own split)
        val_q, test_q = np.sort(rng.permutation(candidates)[:n_val]), np.zeros(0, np.int64)
    is_held = np.zeros(nq, dtype=bool)
    is_held[val_q] = is_held[test_q] = True

    train = ~is_held[pos_q]
    qrels: dict[int, dict[int, float]] = {int(q): {} for q in np.concatenate([val_q, test_q])}
    for q, d in zip(pos_q[~train].tolist(), pos_d[~train].tolist()):
        qrels[q][d] = 1.0

    neg = np.unique(qid[~pos & ~is_held[qid]] * nd + did[~pos & ~is_held[qid]])  # sorted by (query, document)
    neg_ptr, neg_doc = csr(neg // max(nd, 1), neg % max(nd, 1), nq)

    return TrainingSet(
        queries=queries, documents=documents,
        q_tokens=TokenTable(queries, vocab, max_query_length, eager),
        d_tokens=TokenTable(documents, vocab, max_document_length, eager),
        pos_q=torch.from_numpy(pos_q[train].astype(np.int64)), pos_d=torch.from_numpy(pos_d[train].astype(np.int64)),
        neg_ptr=neg_ptr, neg_doc=neg_doc,
        val_q=torch.from_numpy(val_q.astype(np.int64)), val_qrels=[qrels[int(q)] for q in val_q],
        test_q=torch.from_numpy(test_q.astype(np.int64)), test_qrels=[qrels[int(q)] for q in test_q],
        pos_keys=torch.from_numpy(np.unique(keys)),
    )


def held_out_size(fraction: float, candidates: int, min_queries: int, max_queries: int) -> int:
    """Queries to hold out: ``fraction`` of those with a positive, at least ``min_queries`` (at most a fifth of
    them: choices made on a handful are noise) and at most ``max_queries`` (0: no cap; a large file's other
    queries train, and each evaluation stays short)."""
    if fraction <= 0 or candidates < MIN_FOR_VALIDATION:
        return 0
    n = max(1, int(round(fraction * candidates)), min(min_queries, candidates // 5))
    return min(n, max(max_queries, min(min_queries, candidates // 5))) if max_queries > 0 else n


def seen_text(texts: pl.Series, vocab, max_len: int) -> pl.Series:
    """A query as the query tower reads it: cut, lowercased when the vocabulary is, spaces runs as one."""
    return vocab.prepare_texts(texts, max_len).str.replace_all(r"\s+", " ").str.strip_chars()


def seen_text_groups(queries, candidates: np.ndarray, vocab, max_len: int, rows: int = 65536) -> np.ndarray:
    """A group number per candidate query: equal for queries whose `seen_text` is equal (two 64-bit hashes)."""
    from twotower_cli.data.tokens import text_list

    parts = []
    for s in range(0, len(candidates), rows):
        texts = seen_text(pl.Series(text_list(queries, candidates[s:s + rows]), dtype=pl.String), vocab, max_len)
        key = np.empty(len(texts), dtype=[("a", "<u8"), ("b", "<u8")])
        key["a"], key["b"] = texts.hash(0x5EE).to_numpy(), texts.hash(0x7E7).to_numpy()
        parts.append(key)
    keys = np.concatenate(parts) if parts else np.zeros(0, dtype=[("a", "<u8"), ("b", "<u8")])
    return np.unique(keys, return_inverse=True)[1].reshape(-1)


def held_out(candidates: np.ndarray, groups: np.ndarray, n_val: int, n_test: int, rng) -> tuple[np.ndarray, ...]:
    """Whole groups of candidate queries, in a random order of groups: into validation while it has room for the
    group, else into the test split while it has room; at most ``n_val`` and ``n_test`` queries. Each sorted."""
    order = rng.permutation(int(groups.max()) + 1 if groups.size else 0)
    members = np.argsort(groups, kind="stable")
    starts = np.searchsorted(groups[members], np.arange(order.size + 1))
    val, test, room = [], [], [n_val, n_test]
    for g in order.tolist():
        if room[0] == room[1] == 0:
            break
        size = int(starts[g + 1] - starts[g])
        side = 0 if size <= room[0] else 1 if size <= room[1] else None
        if side is not None:  # (a group too large for the room left stays in training)
            (val, test)[side].append(candidates[members[starts[g]:starts[g + 1]]])
            room[side] -= size
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cat(val), cat(test)


def csr(keys: np.ndarray, values: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group ``values`` by ``keys`` (sorted by key) into offsets [n+1] and values."""
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(keys, minlength=n)
    ptr = np.concatenate([[0], np.cumsum(counts)])
    return torch.from_numpy(ptr.astype(np.int64)), torch.from_numpy(values[order].astype(np.int64))


def add_negatives(train_set: TrainingSet, q: np.ndarray, d: np.ndarray) -> None:
    """Append mined negatives (query index, document index) to the per-query lists."""
    starts, ends = train_set.neg_ptr[:-1].cpu().numpy(), train_set.neg_ptr[1:].cpu().numpy()
    old_q = np.repeat(np.arange(len(starts)), ends - starts)
    keys = np.concatenate([old_q, q])
    vals = np.concatenate([train_set.neg_doc.cpu().numpy(), d])
    train_set.neg_ptr, train_set.neg_doc = csr(keys, vals, len(starts))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of training positives for one epoch: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g)


def span_pairs(train_set: TrainingSet, vocab, max_len: int, share: float, seed: int, epoch: int) -> None:
    """Set this epoch's span pairs: ``share`` x the training pairs, each a run of words cut at random from a
    training document (never a validation positive), as many words as a training query of the file picked at
    random has. The document is the span's positive. A pure function of (seed, epoch), for exact resume.

    Why: a user's pairs are few, their documents' text is plenty. A span is relevant to its own document and to
    no other in the batch, so the model learns which n-grams tell documents apart (what IDF knows) on every
    document, instead of memorising the few pairs (the inverse-cloze and cropping tasks of dense retrieval)."""
    m = int(round(share * train_set.n_train))
    if m <= 0:
        train_set.span_d = train_set.span_tokens = None
        return
    rng = np.random.default_rng([seed, epoch, 0x5BA2])
    exclude = np.zeros(len(train_set.documents), dtype=bool)
    exclude[train_set.held_out_documents()] = True
    pool = np.flatnonzero(~exclude)
    docs = pool[rng.integers(0, len(pool), m)]
    words = train_set.documents.gather(docs).str.extract_all(r"\S+")
    n = words.list.len().fill_null(0).to_numpy()
    lengths = train_set.queries.gather(np.unique(train_set.pos_q.cpu().numpy())).str.count_matches(r"\S+").to_numpy()
    k = np.clip(rng.choice(lengths, m), 1, np.maximum(n, 1))
    start = (rng.random(m) * (n - k + 1)).astype(np.int64).clip(min=0)
    spans = pl.DataFrame({"w": words, "s": start, "k": k}).select(
        pl.col("w").list.slice(pl.col("s"), pl.col("k")).list.join(" ")).to_series()
    device = train_set.pos_d.device
    train_set.span_d = torch.from_numpy(docs.astype(np.int64)).to(device)
    train_set.span_tokens = torch.from_numpy(vocab.encode(spans, max_len)).to(device)


def sample_negatives(train_set: TrainingSet, seed: int, epoch: int) -> torch.Tensor:
    """One negative document per training positive (-1 where its query has none), a pure function of the epoch.
    Span pairs (after the training pairs) have none."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch + 7)
    r = torch.rand(train_set.n_train, generator=g, dtype=torch.float64)
    ptr = train_set.neg_ptr.cpu()
    q = train_set.pos_q.cpu()
    start, count = ptr[q], ptr[q + 1] - ptr[q]
    pick = start + (r * count).long().clamp(max=torch.clamp(count - 1, min=0))
    neg = torch.full((train_set.n_train,), -1, dtype=torch.long)
    has = count > 0
    neg[has] = train_set.neg_doc.cpu()[pick[has]]
    # never use the positive itself as its negative (duplicated rows with both labels)
    neg[neg == train_set.pos_d.cpu()] = -1
    return torch.cat([neg, torch.full((train_set.n_epoch - train_set.n_train,), -1, dtype=torch.long)])


def steps_per_epoch(n: int, batch_size: int, processes: int = 1) -> int:
    """Steps of an epoch of ``n`` positives. Under DDP every process takes the same number of full batches (the
    ragged rest is dropped); one process takes them all, a last single pair joining the batch before it (a pair
    alone has nothing to be told apart from)."""
    if processes > 1:
        return n // (batch_size * processes)
    return n // batch_size if n % batch_size == 1 and n > 1 else math.ceil(n / batch_size)


def step_positions(step: int, steps: int, global_batch: int, rank: int, batch_size: int) -> slice:
    """The positions of this epoch's order that process ``rank`` trains on at ``step`` (see `steps_per_epoch`)."""
    start = step * global_batch + rank * batch_size
    last = step == steps - 1 and global_batch == batch_size  # one process: the last step takes the rest
    return slice(start, None if last else start + batch_size)


@dataclass
class Batch:
    """One step's data: ids of its positives (and extra negatives) and their token rows."""
    qi: torch.Tensor  # [b] query index of each positive pair
    di: torch.Tensor  # [b] document index of each positive pair
    ni: torch.Tensor  # infonce: [m] extra negatives (m <= b); triplet: [b] one negative per pair
    q_tokens: torch.Tensor  # [b, Lq]
    d_tokens: torch.Tensor  # [b + m, Ld]: the positives, then the negatives


def make_batch(train_set: TrainingSet, idx: torch.Tensor, negs: torch.Tensor, loss: str) -> Batch:
    """The batch of positives ``idx`` (positions in this epoch's training pairs, then span pairs) with this epoch's
    negatives."""
    ni = negs[idx]
    real = idx < train_set.n_train
    if train_set.span_d is None or bool(real.all()):
        qi, di = train_set.pos_q[idx], train_set.pos_d[idx]
        q_tokens = train_set.q_tokens[qi]
    else:  # span pairs: their query ids follow the file's queries, so none is masked as another's positive
        j = (idx - train_set.n_train).clamp(min=0)
        k = idx.clamp(max=train_set.n_train - 1)
        qi = torch.where(real, train_set.pos_q[k], train_set.n_queries + j)
        di = torch.where(real, train_set.pos_d[k], train_set.span_d[j])
        q_tokens = torch.empty((idx.shape[0], train_set.span_tokens.shape[1]), dtype=train_set.span_tokens.dtype,
                               device=train_set.span_tokens.device)
        if bool(real.any()):
            q_tokens[real] = train_set.q_tokens[qi[real]].to(q_tokens.device, q_tokens.dtype)
        q_tokens[~real] = train_set.span_tokens[j[~real]]
    if loss == "triplet":  # no negative in the file: a document of another pair that is not relevant to mine
        ni = ni.clone()
        for shift in range(1, min(idx.shape[0], 9)):
            need = ni < 0
            if not bool(need.any()):
                break
            other = di.roll(shift)
            ok = need & ~train_set.is_pair(qi, other) & (other != di)
            ni[ok] = other[ok]
        ni = torch.where(ni >= 0, ni, di.roll(1))  # none found among 8 (a batch of one query's positives)
    else:
        ni = ni[ni >= 0]
    return Batch(qi, di, ni, q_tokens, train_set.d_tokens[torch.cat([di, ni])])  # one document pass


def epoch_batches(train_set: TrainingSet, order: torch.Tensor, negs: torch.Tensor, first: int, steps: int,
                  global_batch: int, rank: int, batch_size: int, loss: str, device, prefetch: bool):
    """Yield (idx, batch) for steps first..steps-1: process ``rank``'s slice of each global batch of ``order``.
    With ``prefetch`` the next step's batch is made in a background thread (tokenising on demand overlaps the
    current step)."""
    def fetch(i: int):
        idx = order[step_positions(i, steps, global_batch, rank, batch_size)].to(device, non_blocking=True)
        return idx, make_batch(train_set, idx, negs, loss)

    if not prefetch:
        for i in range(first, steps):
            yield fetch(i)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="twotower-batches") as pool:
        pending = pool.submit(fetch, first) if first < steps else None
        for i in range(first, steps):
            current = pending.result()
            pending = pool.submit(fetch, i + 1) if i + 1 < steps else None
            yield current
