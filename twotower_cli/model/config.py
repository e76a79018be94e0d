"""A model's configuration: everything needed to rebuild it (besides its vocabulary and weights), saved in
`config.json`. No torch here, so the NumPy query path can read it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

MOD = 2147483647  # 2**31 - 1: products of two residues stay inside int64
MIX = 2654435761  # Knuth's multiplicative hash constant
BASE = 1000003


def hash_powers(n: int) -> tuple[list[int], list[int]]:
    """BASE^i and its inverse mod MOD for i < n: the words' polynomial hashes (both towers' implementations)."""
    pw, ipw, inv = [1] * n, [1] * n, pow(BASE, MOD - 2, MOD)
    for i in range(1, n):
        pw[i], ipw[i] = pw[i - 1] * BASE % MOD, ipw[i - 1] * inv % MOD
    return pw, ipw


@dataclass
class ModelConfig:
    encoder: str = "ngram"
    vocab_size: int = 256
    embedding_dim: int = 128
    hidden_dim: int = 256
    ngram_buckets: int = 262144
    cnn_widths: list[int] = field(default_factory=lambda: [3, 5])
    max_query_length: int = 64
    max_document_length: int = 512
    word_chars: list[int] = field(default_factory=list)  # vocabulary ids of characters that form words
    word_bigrams: bool = False  # ngram encoder: also hash pairs of consecutive words
    # one embedding table for both towers (each keeps its own norm and projection)
    shared_embeddings: bool = False
    # weight each n-gram by its inverse document frequency in the training documents (stored in the weights file
    # as ``idf``), so that the model starts as a TF-IDF matcher
    idf: bool = False
    # ngram encoder: a fixed lexical half of the embedding, the text's TF-IDF n-gram vector hashed (with random
    # signs) into ``lexical_dim`` dimensions; no parameters, so training cannot destroy it. The embedding is
    # [sqrt(w) x lexical, sqrt(1 - w) x learned], each half unit length, so its cosine is w x the lexical cosine +
    # (1 - w) x the learned one. 0: no lexical half.
    lexical_dim: int = 0
    lexical_weight: float = 0.5
    # idf models: each feature weighted by idf^idf_power on both sides, so a match scores about idf^(2 x power):
    # BM25 scores a matching word by idf once; the cosine of idf-weighted vectors by idf squared, which lets a rare
    # word of a long document outweigh the query's common words
    idf_power: float = 1.0
    word_share: float = 0.3  # idf models: the words' share of a text's squared feature norm (trigrams: the rest)
    # lexical half of a document: its unit vector times (words / mean words)^length_power. 0 is the cosine, which
    # penalises long documents much more than BM25 does
    length_power: float = 0.0
    # search re-scores the best rows with the exact, sparse lexical half (`retrieval/lexical.py`) instead of its
    # hashed sketch alone; the index stores the documents' sparse rows
    lexical_exact: bool = False
    # exact lexical half of a document (``lexical_exact``): the characters it reads, more than the learned half
    # when documents are long (it costs no training time: it has no parameters). 0: ``max_document_length``.
    lexical_document_length: int = 0
    # exact lexical half of a document: its opening ``lead_characters`` (cut before a word they would split) count
    # a second time, at ``lead_weight`` chosen on validation (`training.choices`): titles and summaries open most
    # documents. 0: off.
    lead_characters: int = 0
    lead_weight: float = 0.0
    # encoder "transformer" (`model.transformer`): the base model it was fine-tuned from (as the user named it),
    # the sha256 of that model's weights file, its pooling, and the tokens it reads of a query and a document
    base_model: str = ""
    base_model_sha256: str = ""
    pooling: str = "mean"
    max_query_tokens: int = 0
    max_document_tokens: int = 0

    @property
    def lexical_length(self) -> int:
        """Characters of a document that its exact lexical rows read."""
        return self.lexical_document_length or self.max_document_length

    @property
    def output_dim(self) -> int:
        """Size of the embeddings the towers output (what an index stores)."""
        return self.embedding_dim + (self.lexical_dim if self.encoder in ("ngram", "transformer") else 0)

    def to_dict(self) -> dict:
        return asdict(self)
