"""Layered configuration: built-in defaults < config.toml < environment (.env, real variables) < flags.

Every setting lives in one table below (section, key, default, help). Environment names are
``TWOTOWER_<SECTION>_<KEY>``; W&B's own ``WANDB_API_KEY``/``WANDB_PROJECT``/``WANDB_ENTITY`` are read too.
The effective configuration remembers where each value came from, so ``twotower config`` can show it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from twotower_cli.config_checks import problem
from twotower_cli.errors import ConfigError

# (default, help). The type of the default is the type of the setting; None defaults are strings.
FIELDS: dict[str, dict[str, tuple[Any, str]]] = {
    "data": {
        "query_col": ("query", "column holding the query text"),
        "document_col": ("document", "column holding the document text"),
        "label_col": ("label", "column holding the label (1 relevant, 0 negative); optional in the file"),
        "max_query_length": (128, "characters of a query the model reads (the shipped sample's p95 is ~70)"),
        "max_document_length": (1024, "characters of a document the model reads (a transformer: "
                                      "--max-document-tokens)"),
        "lexical_document_length": (2048, "characters of a document that the exact lexical half reads (0: "
                                          "max_document_length); it has no parameters, so reading more does "
                                          "not slow training; words past max_document_length count when a "
                                          "search re-scores its best rows"),
        "tokenize": ("auto", "upfront (all texts before training), on-demand (each step its rows) or auto "
                             "(upfront for one process unless the token rows would pass 1 GiB, on-demand "
                             "under torchrun)"),
    },
    "vocab": {
        "min_freq": (2, "characters seen fewer times become the unknown id"),
        "max_size": (2000, "most frequent characters kept (ids 0 and 1 included)"),
        "lowercase": (True, "lowercase text before building and encoding"),
    },
    "model": {
        "encoder": ("ngram", "ngram (hashed character n-grams + words), cnn (char CNN) or mean (mean of "
                             "characters); --base-model for a pretrained transformer"),
        "embedding_dim": (128, "size of the final L2-normalised embedding"),
        "hidden_dim": (128, "size of the character/n-gram embeddings and hidden layers"),
        "ngram_buckets": (131072, "hash buckets of the ngram encoder"),
        "cnn_widths": ("3,5", "convolution widths of the cnn encoder"),
        "word_bigrams": (False, "ngram encoder: also hash pairs of consecutive words"),
        "shared_embeddings": (True, "one embedding table for both towers"),
        "lexical_dim": (1024, "ngram encoder: dimensions of the fixed lexical half of the embedding (hashed "
                              "TF-IDF n-grams, the exact sparse half's sketch; 0: none)"),
        "lexical_weight": (0.5, "weight of the lexical half in the embedding's cosine during training"),
        "length_power": (0.25, "ngram encoder with a lexical half: a document's lexical half is scaled by "
                               "(its words / the mean)^power (0: cosine)"),
        "word_share": (0.3, "ngram encoder with idf: the words' share of a text's n-gram weight (trigrams get"
                            " the rest)"),
        "idf_power": (0.75, "ngram encoder with idf: each n-gram is weighted by idf^power (a match scores "
                            "about idf^(2 x power))"),
        "idf": (True, "ngram encoder: weight n-grams by their inverse document frequency in the training "
                      "documents"),
        "lexical_exact": (True, "search re-scores its best rows with the exact sparse lexical half, not only "
                                "its hashed sketch (the index stores the sparse rows)"),
        "base_model": ("", "a pretrained Hugging Face encoder to start from (a model folder or a hub name; "
                           "needs the hf extra): the learned half of both towers, fine-tuned on the pairs, "
                           "with its own defaults for the settings left alone ('': the n-gram model)"),
        "max_query_tokens": (64, "models with a base model: tokens of a query the encoder reads"),
        "max_document_tokens": (128, "models with a base model: tokens of a document the encoder reads (at "
                                     "most the base model's own limit); the exact lexical half still reads "
                                     "lexical_document_length characters"),
        "lead_characters": (100, "models with the exact lexical half: a document's first N characters count a"
                                 " second time in it, at a weight chosen on validation, 0 when that does not "
                                 "help (0: never)"),
    },
    "train": {
        "epochs": (8, "passes over the training pairs; the best epoch on validation is kept (with "
                      "--base-model: 1)"),
        "batch_size": (256, "positive pairs per step (more in-batch negatives with infonce; with "
                            "--base-model: 64)"),
        "learning_rate": (1e-2, "peak learning rate (with --base-model: 1e-4)"),
        "warmup_fraction": (0.05, "share of steps that warm the learning rate up; then linear decay (with "
                                  "--base-model: 0.1)"),
        "weight_decay": (0.0, "AdamW weight decay of dense parameters"),
        "loss": ("infonce", "infonce (in-batch softmax) or triplet (a cosine margin)"),
        "temperature": (0.05, "softmax temperature of infonce"),
        "margin": (0.2, "margin of the triplet loss"),
        "seed": (13, "seed of the split, batch order, negatives and initial weights"),
        "val_fraction": (0.05, "share of queries held out for validation"),
        "val_min_queries": (100, "validation holds out at least this many queries (at most a fifth of them), and so "
                                 "does the test split: choices made on a few are noise"),
        "val_max_queries": (5000, "validation holds out at most this many queries (0: no cap); a large file's"
                                  " other queries train, and each validation stays short"),
        "test_fraction": (0.05, "share of queries held out from training and from every choice (the epoch, the "
                                "weights, the search): the run's figures are measured on them (0: none); at least "
                                "val_min_queries, at most val_max_queries"),
        "val_corpus_size": (200000, "documents searched in validation: all up to this many, else a sample of "
                                    "this many that keeps every validation positive (0: all)"),
        "device": ("auto", "cpu, cuda, cuda:N or auto"),
        "precision": ("fp32", "fp32 or bf16 (bf16 autocast on CUDA only)"),
        "runs_dir": ("runs", "folder holding the run folders and runs/latest"),
        "run_name": ("", "name of the run folder (default: a timestamp)"),
        "loader_workers": (-1, "processes tokenising on demand (-1: none on a CPU, several on a GPU; 0: a "
                               "background thread)"),
        "max_steps": (0, "stop after this many optimiser steps (0: the epochs decide), as the Hugging Face "
                         "trainer"),
        "log_every": (10, "steps between train/* records in metrics.jsonl"),
        "checkpoint_minutes": (10.0, "also checkpoint mid-epoch at this interval (0: epoch ends only)"),
        "gather_negatives": (True, "under torchrun, score queries against every process's documents (InfoNCE)"),
        "file_negatives": (True, "each pair also learns against its query's label-0 documents of the file "
                                 "(random negatives: for a base model, in-batch ones do as well at half the "
                                 "cost)"),
        "hard_negatives": ("none", "none, bm25 or model: mined negatives added to each batch"),
        "span_pairs": (0.0, "extra positives per epoch, as a share of the pairs: a span of words cut from a "
                            "training document, paired with it"),
        "keep_checkpoint": (False, "keep checkpoint.safetensors (optimizer state, for --resume) after the run"
                                   " completes"),
        "report": (True, "write the HTML report at the end of training"),
        "log_level": ("info", "debug, info, warning or error"),
    },
    "search": {
        "top_k": (10, "results per query"),
        "index": ("default", "name of the index searched"),
        "mode": ("auto", "auto (what training chose on validation), dense, hybrid or bm25"),
        "hybrid_weight": (0.5, "weight of the dense score when hybrid is forced (auto uses the weight chosen "
                               "on validation)"),
    },
    "wandb": {
        "enabled": (False, "log the run to Weights & Biases"),
        "project": ("twotower", "W&B project"),
        "entity": ("", "W&B entity (team or user)"),
        "run_name": ("", "W&B display name"),
        "mode": ("", "online, offline or disabled (default: WANDB_MODE, else decided by key and network)"),
        "api_key": ("", "W&B API key (secret; prefer WANDB_API_KEY in .env)"),
        "init_timeout": (15.0, "seconds wandb.init may take before falling back to offline"),
    },
}

SECRETS = {("wandb", "api_key")}
# Names W&B users already have in their environment.
ALIASES = {"WANDB_API_KEY": ("wandb", "api_key"), "WANDB_PROJECT": ("wandb", "project"),
           "WANDB_ENTITY": ("wandb", "entity")}
# TWOTOWER_* variables that are not settings.
RESERVED_ENV = {"TWOTOWER_CONFIG", "TWOTOWER_DEBUG"}


class Section:
    """Attribute access to one section's values (``cfg.train.batch_size``)."""

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Config:
    values: dict[str, dict[str, Any]]
    sources: dict[str, dict[str, str]] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Section:
        if name in ("values", "sources"):
            raise AttributeError(name)
        try:
            return Section(self.values[name])
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self, mask_secrets: bool = True) -> dict[str, dict[str, Any]]:
        out = {s: dict(kv) for s, kv in self.values.items()}
        if mask_secrets:
            for s, k in SECRETS:
                out[s][k] = mask(out[s][k])
        return out

    def with_overrides(self, overrides: Mapping[tuple[str, str], Any], source: str = "flag") -> "Config":
        values = {s: dict(kv) for s, kv in self.values.items()}
        sources = {s: dict(kv) for s, kv in self.sources.items()}
        for (section, key), raw in overrides.items():
            if raw is None:
                continue
            values[section][key] = coerce(section, key, raw, source)
            sources[section][key] = source
        return Config(values, sources)


def mask(value: Any) -> str:
    return "(set, hidden)" if value else ""


def coerce(section: str, key: str, raw: Any, source: str) -> Any:
    """Convert ``raw`` to the setting's type and check its value, or raise a one-line error naming key and
    source (a flag's error is a usage error: exit 2)."""
    value = convert(section, key, raw, source)
    wrong = problem(section, key, value)
    if wrong:
        if source == "flag":  # named as the user typed it
            err = ConfigError(f"--{key.replace('_', '-')} must be {wrong}, got {raw!r}")
            err.exit_code = 2
        else:
            err = ConfigError(f"setting '{section}.{key}' in {source} must be {wrong}, got {raw!r}")
        raise err
    return value


def convert(section: str, key: str, raw: Any, source: str) -> Any:
    if section not in FIELDS or key not in FIELDS[section]:
        known = ", ".join(f"{section}.{k}" for k in FIELDS.get(section, {})) or ", ".join(FIELDS)
        raise ConfigError(f"unknown setting '{section}.{key}' in {source}; known: {known}")
    default = FIELDS[section][key][0]
    kind = type(default)
    bad = ConfigError(f"setting '{section}.{key}' in {source} must be {kind.__name__}, got {raw!r}")
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        raise bad
    if kind is int:
        if isinstance(raw, bool):
            raise bad
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                raise bad from None
        raise bad
    if kind is float:
        if isinstance(raw, bool):
            raise bad
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw.strip())
            except ValueError:
                raise bad from None
        raise bad
    if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
        return str(raw)
    raise bad


def find_config_file(explicit: str | os.PathLike | None, env: Mapping[str, str]) -> Path | None:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; check --config")
        return path
    if env.get("TWOTOWER_CONFIG"):
        path = Path(env["TWOTOWER_CONFIG"])
        if not path.is_file():
            raise ConfigError(f"config file {path} (from TWOTOWER_CONFIG) not found; fix or unset the variable")
        return path
    path = Path("config.toml")
    return path if path.is_file() else None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the file or pass another with --config") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None


def environment(dotenv_path: str | os.PathLike = ".env") -> tuple[dict[str, str], dict[str, str]]:
    """Real variables win over .env ones, which never override what is already set."""
    from dotenv import dotenv_values  # light, but only needed here

    dotenv = {}
    if Path(dotenv_path).is_file():
        dotenv = {k: v for k, v in dotenv_values(dotenv_path).items() if v is not None}
    merged = {**dotenv, **os.environ}
    origin = {k: ("env" if k in os.environ else ".env") for k in merged}
    return merged, origin


def load_config(config_path: str | os.PathLike | None = None,
                overrides: Mapping[tuple[str, str], Any] | None = None,
                env: Mapping[str, str] | None = None,
                env_origin: Mapping[str, str] | None = None) -> Config:
    if env is None:
        env, env_origin = environment()
    env_origin = env_origin or {}
    values = {s: {k: d for k, (d, _) in kv.items()} for s, kv in FIELDS.items()}
    sources = {s: {k: "default" for k in kv} for s, kv in FIELDS.items()}

    path = find_config_file(config_path, env)
    if path is not None:
        for section, table in read_toml(path).items():
            if section not in FIELDS:
                raise ConfigError(f"{path}: unknown section [{section}]; known: {', '.join(FIELDS)}")
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: '{section}' must be a [section] table")
            for key, raw in table.items():
                values[section][key] = coerce(section, key, raw, str(path))
                sources[section][key] = "config.toml"

    for name, raw in sorted(env.items()):
        if name in ALIASES:
            section, key = ALIASES[name]
        elif name.startswith("TWOTOWER_") and name not in RESERVED_ENV:
            found = split_env_name(name, env_origin.get(name, "env"))
            if found is None:
                continue
            section, key = found
        else:
            continue
        where = f"environment variable {name}" + (" (.env)" if env_origin.get(name) == ".env" else "")
        values[section][key] = coerce(section, key, raw, where)
        sources[section][key] = "env"

    return Config(values, sources).with_overrides(overrides or {})


def split_env_name(name: str, origin: str) -> tuple[str, str] | None:
    """TWOTOWER_<SECTION>_<KEY> -> (section, key); a typo in the key of a known section is an error.

    A name whose prefix is no section (TWOTOWER_REQUIRE_CHROMIUM, set by CI) is not ours to judge: None."""
    rest = name[len("TWOTOWER_"):].lower()
    for section in FIELDS:
        if rest.startswith(section + "_"):
            key = rest[len(section) + 1:]
            if key in FIELDS[section]:
                return section, key
            raise ConfigError(f"unknown setting '{section}.{key}' in environment variable {name}"
                              f"{' (.env)' if origin == '.env' else ''}; known: "
                              + ", ".join(f"TWOTOWER_{section.upper()}_{k.upper()}" for k in FIELDS[section]))
    return None
