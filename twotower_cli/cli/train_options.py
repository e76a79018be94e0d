"""The flags of `twotower train`, declared once each: most set a setting of config.toml (`options.setting`), and
`setting_overrides` reads which from the declarations themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional, get_type_hints

import typer

from twotower_cli.cli.options import setting

Opt = typer.Option

Data = Annotated[Optional[Path], typer.Argument(
    readable=False, metavar="DATA", show_default=False,
    help="Pairs file (.tsv, .csv, .parquet, .jsonl); not needed with --resume.")]
Epochs = Annotated[Optional[int], setting("train", "epochs", "--epochs")]
BatchSize = Annotated[Optional[int], setting(
    "train", "batch_size", "--batch-size", "--batch_size",
    help="Positive pairs per step; fitted to small files.")]
LearningRate = Annotated[Optional[float], setting(
    "train", "learning_rate", "--learning-rate", "--learning_rate", "--lr", help="Peak learning rate.",
    metavar="LR")]
MaxSteps = Annotated[Optional[int], setting("train", "max_steps", "--max-steps")]
Device = Annotated[Optional[str], setting("train", "device", "--device", metavar="DEVICE")]
Precision = Annotated[Optional[str], setting("train", "precision", "--precision", metavar="fp32|bf16")]
Loss = Annotated[Optional[str], setting("train", "loss", "--loss", metavar="infonce|triplet")]
Encoder = Annotated[Optional[str], setting("model", "encoder", "--encoder", metavar="ngram|cnn|mean")]
BaseModel = Annotated[Optional[str], setting(
    "model", "base_model", "--base-model", metavar="NAME_OR_FOLDER",
    help="Start from a pretrained Hugging Face encoder (a model folder or a hub name; pip install -e "
         "'.[hf]').")]
MaxQueryTokens = Annotated[Optional[int], setting(
    "model", "max_query_tokens", "--max-query-tokens",
    help="With --base-model: tokens of a query the encoder reads.")]
MaxDocumentTokens = Annotated[Optional[int], setting(
    "model", "max_document_tokens", "--max-document-tokens",
    help="With --base-model: tokens of a document the encoder reads.")]
EmbeddingDim = Annotated[Optional[int], setting(
    "model", "embedding_dim", "--embedding-dim", "--embedding_dim", help="Size of the learned embedding.")]
HiddenDim = Annotated[Optional[int], setting(
    "model", "hidden_dim", "--hidden-dim", "--hidden_dim",
    help="Size of the n-gram/character embeddings and hidden layers.")]
LexicalDim = Annotated[Optional[int], setting("model", "lexical_dim", "--lexical-dim")]
MaxQueryLength = Annotated[Optional[int], setting(
    "data", "max_query_length", "--max-query-length", help="Characters of a query the model reads.")]
MaxDocumentLength = Annotated[Optional[int], setting(
    "data", "max_document_length", "--max-document-length",
    help="Characters of a document the model reads.")]
LexicalDocumentLength = Annotated[Optional[int], setting(
    "data", "lexical_document_length", "--lexical-document-length",
    help="Characters of a document the exact lexical half reads (0: --max-document-length).")]
LeadCharacters = Annotated[Optional[int], setting(
    "model", "lead_characters", "--lead-characters",
    help="A document's first N characters count again in the exact lexical half, at a weight chosen on "
         "validation (0: never).")]
Tokenize = Annotated[Optional[str], setting("data", "tokenize", "--tokenize", metavar="MODE")]
Temperature = Annotated[Optional[float], setting(
    "train", "temperature", "--temperature", help="Softmax temperature of infonce.")]
Margin = Annotated[Optional[float], setting(
    "train", "margin", "--margin", help="Margin of the triplet loss.")]
Seed = Annotated[Optional[int], setting(
    "train", "seed", "--seed", help="Seed of the split, batch order, negatives and initial weights.")]
ValFraction = Annotated[Optional[float], setting(
    "train", "val_fraction", "--val-fraction", help="Share of queries held out for validation.")]
ValMaxQueries = Annotated[Optional[int], setting(
    "train", "val_max_queries", "--val-max-queries",
    help="Most queries held out for validation (0: no cap).")]
ValCorpusSize = Annotated[Optional[int], setting(
    "train", "val_corpus_size", "--val-corpus-size",
    help="Documents searched in validation: all up to N, else a sample of N keeping the positives (0: "
         "all).")]
EvalDir = Annotated[Optional[Path], Opt(
    "--eval", readable=False, metavar="EVAL", show_default=False,
    help="Extra evaluation folder (BEIR or Parquet layout), scored each epoch.")]
RunName = Annotated[Optional[str], setting(
    "train", "run_name", "--run-name", metavar="NAME",
    help="Name prefix of the run folder (letters, digits, . _ -).")]
Resume = Annotated[Optional[str], Opt(
    "--resume", metavar="RUN", show_default=False, help="Continue an interrupted run (id or folder).")]
KeepCheckpoint = Annotated[Optional[bool], setting(
    "train", "keep_checkpoint", "--keep-checkpoint/--no-keep-checkpoint")]
Wandb = Annotated[Optional[bool], setting(
    "wandb", "enabled", "--wandb/--no-wandb", help="Log to Weights & Biases.")]
WandbProject = Annotated[Optional[str], setting(
    "wandb", "project", "--wandb-project", "--wandb_project", metavar="NAME")]
WandbEntity = Annotated[Optional[str], setting(
    "wandb", "entity", "--wandb-entity", "--wandb_entity", metavar="NAME")]
WandbRunName = Annotated[Optional[str], setting(
    "wandb", "run_name", "--wandb-run-name", "--wandb_run_name", metavar="NAME")]
HardNegatives = Annotated[Optional[str], setting(
    "train", "hard_negatives", "--hard-negatives", metavar="none|bm25|model")]
SharedEmbeddings = Annotated[Optional[bool], setting(
    "model", "shared_embeddings", "--shared-embeddings/--separate-embeddings",
    help="One n-gram table for both towers (or one each).")]
GatherNegatives = Annotated[Optional[bool], setting(
    "train", "gather_negatives", "--gather-negatives/--no-gather-negatives",
    help="Under torchrun: InfoNCE over every process's documents.")]
Report = Annotated[Optional[bool], setting(
    "train", "report", "--report/--no-report", help="Write the HTML report at the end.")]
LogLevel = Annotated[Optional[str], setting(
    "train", "log_level", "--log-level", "--log_level", metavar="LEVEL")]


def setting_overrides(command, values: dict) -> dict:
    """{(section, key): value} for every parameter of ``command`` declared with `options.setting`."""
    out = {}
    for name, hint in get_type_hints(command, include_extras=True).items():
        for meta in getattr(hint, "__metadata__", ()):
            if getattr(meta, "twotower_setting", None):
                out[meta.twotower_setting] = values.get(name)
    return out
