"""The data as training needs it: the pairs file streamed into numbered rows and stores of distinct texts
(`data.stream`), the vocabulary, the training set tokenised up front or on demand, the batch fitted to the data,
and the model configuration they give."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from twotower_cli.config import Config
from twotower_cli.data.stream import read_pairs_rows, sorted_numbering
from twotower_cli.data.vocab import Vocab
from twotower_cli.errors import DataError, UsageError
from twotower_cli.model.towers import ModelConfig
from twotower_cli.runs import Lock, read_json, scratch_dir
from twotower_cli.training.batches import TrainingSet, from_rows

TEXTS = ".texts-"  # the folders of the texts training reads back (runs_dir/.texts-PID-RANDOM)
TEXT_ORDER = "first-seen"  # texts are numbered as they first appear in the file (compat.py: runs that sorted them)
HELD_OUT = "by seen text"  # queries the query tower reads alike are held out together
TOO_SMALL = 50  # fewer training pairs than this: train, but say that nothing much can be learned


@dataclass
class Prepared:
    """The data as training needs it; `close` removes the texts it wrote to disk."""
    file_rows: int  # rows in the pairs file
    examples: list  # its first usable rows
    vocab: Vocab
    train_set: TrainingSet
    batch_size: int
    extra: object = None
    messages: list = field(default_factory=list)
    folder: Path | None = None
    lock: Lock | None = None

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.lock is not None:
            self.lock.release()


def model_config(cfg: Config, vocab: Vocab, base: Path | None = None) -> ModelConfig:
    """The model the settings describe; with ``base`` (the base model's folder) a transformer's."""
    m = cfg.model
    lexical = m.encoder == "ngram" or bool(m.base_model)  # the encoders with the n-gram lexical half
    exact = has_exact_half(m)
    out = ModelConfig(encoder=m.encoder, vocab_size=len(vocab), embedding_dim=m.embedding_dim,
                      hidden_dim=m.hidden_dim, ngram_buckets=m.ngram_buckets,
                      cnn_widths=[int(w) for w in str(m.cnn_widths).split(",") if w.strip()],
                      max_query_length=cfg.data.max_query_length, max_document_length=cfg.data.max_document_length,
                      word_chars=[i + 2 for i, c in enumerate(vocab.chars) if c.isalnum()],
                      word_bigrams=m.word_bigrams, shared_embeddings=m.shared_embeddings, idf=m.idf and lexical,
                      lexical_dim=m.lexical_dim if lexical else 0, lexical_weight=m.lexical_weight,
                      word_share=m.word_share, length_power=m.length_power, idf_power=m.idf_power,
                      lexical_exact=exact, lexical_document_length=cfg.data.lexical_document_length if exact else 0,
                      lead_characters=m.lead_characters if exact else 0)
    if base is not None:
        from twotower_cli.model.transformer import hidden_size, pooling_of, weights_sha256

        pooling, longest = pooling_of(base)
        out.encoder, out.base_model, out.base_model_sha256 = "transformer", m.base_model, weights_sha256(base)
        out.embedding_dim, out.pooling = hidden_size(base), pooling
        out.max_query_tokens = min(m.max_query_tokens, longest or m.max_query_tokens)
        out.max_document_tokens = min(m.max_document_tokens, longest or m.max_document_tokens)
    return out


def has_exact_half(m) -> bool:
    """Whether the model settings ``m`` (config.toml's [model]) give an exact lexical half."""
    return bool(m.lexical_exact and (m.encoder == "ngram" or m.base_model) and m.idf and m.lexical_dim)


# a pretrained start's own defaults (a setting the user gave is kept): benchmarks/RESULTS.md has the measurements
PRETRAINED = {("train", "learning_rate"): 1e-4, ("train", "epochs"): 1, ("train", "batch_size"): 64,
              ("train", "warmup_fraction"): 0.1, ("train", "temperature"): 0.05, ("train", "file_negatives"): False}


def with_base_model_defaults(cfg: Config) -> Config:
    """``cfg`` with the defaults of a pretrained start where it starts from a base model and the user left them."""
    if not cfg.model.base_model:
        if cfg.train.epochs == 0:
            raise UsageError("--epochs 0 trains nothing: it builds a run from a base model as it is (with "
                             "--base-model); give at least 1 epoch")
        return cfg
    if cfg.sources["model"]["encoder"] != "default" and cfg.model.encoder != "ngram":
        raise UsageError(f"--base-model and --encoder {cfg.model.encoder}: a base model is the encoder; give one")
    unset = {k: v for k, v in PRETRAINED.items() if cfg.sources[k[0]][k[1]] == "default"}
    return cfg.with_overrides(unset, "default for --base-model") if unset else cfg


def unused_settings(cfg: Config) -> list[str]:
    """Notes for settings of the exact lexical half that a user set (not defaults) on a model without one."""
    m = cfg.model
    if has_exact_half(m):
        return []
    why = (f"--encoder {m.encoder} has no lexical half" if m.encoder != "ngram" else "the model has no exact "
           "lexical half (it needs model.idf, model.lexical_dim and model.lexical_exact)")
    return [f"{flag} {cfg.values[section][key]} has no effect: {why}" for (section, key), flag in
            ((("model", "lead_characters"), "--lead-characters"),
             (("data", "lexical_document_length"), "--lexical-document-length"))
            if cfg.sources.get(section, {}).get(key, "default") != "default"]


UPFRONT_LIMIT = 1 << 30  # auto tokenises on demand when the token rows of all texts would take more (bytes)


def prepare(cfg: Config, data: Path, ddp, resume_dir: Path | None, eval_dir: Path | None) -> Prepared:
    """Pairs file -> numbered rows and distinct texts (written beside the runs, read back by row) -> vocabulary ->
    training set (tokenised up front or on demand); the batch fitted to the data; the extra evaluation set."""
    runs = Path(cfg.train.runs_dir)
    created = not runs.exists()
    folder, lock = scratch_dir(runs, TEXTS)
    try:
        p = prepare_in(cfg, data, ddp, resume_dir, eval_dir, folder)
        p.lock = lock
        return p
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        lock.release()
        if created:  # a file that cannot be trained on leaves no empty runs folder behind
            with contextlib.suppress(OSError):
                runs.rmdir()
        raise


def prepare_in(cfg: Config, data: Path, ddp, resume_dir: Path | None, eval_dir: Path | None, folder: Path):
    d, t = cfg.data, cfg.train
    rows = read_pairs_rows(data, (d.query_col, d.document_col, d.label_col), folder,
                           None if resume_dir else cfg.vocab.lowercase)
    messages = []
    if rows.dropped:
        messages.append(f"dropped {rows.dropped} rows with an empty query or document")
    grouped = True
    if resume_dir:  # the run's own split, as it was made
        vocab = Vocab.load(resume_dir / "vocab.json")
        stored = read_json(resume_dir / "config.json").get("data", {})
        if stored.get("text_order") != TEXT_ORDER:
            rows = sorted_numbering(rows)
        grouped = stored.get("held_out") == HELD_OUT
    else:
        vocab = Vocab.from_counts(rows.char_counts, cfg.vocab.min_freq, cfg.vocab.max_size, cfg.vocab.lowercase)
    # auto: one process tokenises everything up front, unless the token rows would be large; under torchrun each
    # process tokenises only its slices of the batches
    size = 4 * (len(rows.queries) * d.max_query_length + len(rows.documents) * d.max_document_length)
    eager = d.tokenize == "upfront" or (d.tokenize == "auto" and ddp is None and size <= UPFRONT_LIMIT)
    train_set = from_rows(rows, vocab, d.max_query_length, d.max_document_length, t.val_fraction, t.seed, eager=eager,
                   val_min_queries=t.val_min_queries, val_max_queries=t.val_max_queries,
                   test_fraction=t.test_fraction, grouped=grouped)
    world = ddp.world if ddp else 1
    if train_set.n_train < 2:
        n = train_set.n_train
        raise DataError(f"{data}: {n} training pair{'' if n == 1 else 's'} after the validation "
                        "split; training needs at least 2 (a pair is learned from against the others in its batch): "
                        "add pairs, or lower --val-fraction")
    batch = t.batch_size
    if batch * world > train_set.n_train:
        if ddp and train_set.n_train < 2 * world:
            raise UsageError(f"{train_set.n_train} training pairs cannot be split across {world} processes; train "
                             "without torchrun")
        batch = max(1, train_set.n_train // world)
        given = cfg.sources["train"]["batch_size"] not in ("default", "default for --base-model")
        what = f"--batch-size {t.batch_size}" if given else f"the batch size ({t.batch_size}, the default)"
        messages.append(f"{what} is larger than the {train_set.n_train} training pairs"
                        f"{f' for {world} processes' if ddp else ''}: training with batches of {batch}")
    if t.val_fraction > 0 and len(train_set.val_q) == 0:
        messages.append("too few queries for a validation split: none is held out, and the epoch with the lowest "
                        "loss is kept")
    held = len(train_set.val_q)
    queries = held + len(train_set.test_q) + len(torch.unique(train_set.pos_q))
    if t.val_max_queries and held <= t.val_max_queries < round(t.val_fraction * queries):
        messages.append(f"validation holds out {t.val_max_queries:,} queries, fewer than --val-fraction "
                        f"{t.val_fraction:g} would (--val-max-queries caps it; 0: no cap)")
    if 0 < t.val_corpus_size < len(train_set.documents) and len(train_set.val_q):
        messages.append(f"validation searches {t.val_corpus_size:,} of the {len(train_set.documents):,} documents, a "
                        "sample that keeps every validation positive (--val-corpus-size 0: all of them)")
    messages += unused_settings(cfg)
    if train_set.n_train < TOO_SMALL:
        messages.append(f"only {train_set.n_train} training pairs: too few to learn much from; the run is trained, but "
                        "expect the lexical baseline (BM25) to do as well or better")
    extra = None
    if eval_dir is not None:
        from twotower_cli.evaluation.eval_sets import load_eval

        ev = load_eval(eval_dir)
        extra = SimpleNamespace(q_tokens=torch.from_numpy(vocab.encode(ev.queries, d.max_query_length)),
                                d_tokens=torch.from_numpy(vocab.encode(ev.documents, d.max_document_length)),
                                qrels=ev.qrels)
    # the rows' ids are in the training set now: only what describes the file is kept
    return Prepared(rows.rows, rows.examples, vocab, train_set, batch, extra, messages, folder)
