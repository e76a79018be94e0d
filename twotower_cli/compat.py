"""What runs and indexes saved by earlier versions of twotower need in order to load and resume as they were
saved: every such rule is here, so the rest of the package describes one format, today's."""

from __future__ import annotations

import hashlib
import json

# settings added since a run was saved, and what the run did before each existed (so that it resumes on its own
# split and with its own model); any other setting takes today's default
BEFORE_SETTING = {("train", "val_min_queries"): 0, ("train", "val_max_queries"): 0, ("train", "val_corpus_size"): 0,
                  ("data", "lexical_document_length"): 0, ("model", "lead_characters"): 0,
                  ("train", "test_fraction"): 0.0, ("train", "file_negatives"): True}


def fingerprint_v1(weights: str, cfg) -> str:
    """A fingerprint of version 1: the weights, and the lexical half's weights when the model has one."""
    if not cfg.lexical_dim:
        return weights
    settings = {"lexical_dim": cfg.lexical_dim, "lexical_weight": cfg.lexical_weight}
    if cfg.lead_characters and cfg.lead_weight:
        settings.update(lead_characters=cfg.lead_characters, lead_weight=cfg.lead_weight)
    return hashlib.sha256((weights + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
