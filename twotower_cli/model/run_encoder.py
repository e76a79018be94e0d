"""A trained run's towers, loaded to encode texts: queries of the default (ngram) model in NumPy straight from the
memory-mapped `model.safetensors` (no torch import, which takes longer than a search), other encoders and devices
in torch. What `api.TwoTowerModel`, `evaluate` and the choices after training encode with."""

from __future__ import annotations

import threading
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np

from twotower_cli.errors import ArtifactError, UsageError


def clean(text) -> str:
    """What files get when read: NFKC. A lone surrogate (possible in a Python str, never in a file) becomes
    U+FFFD, as an undecodable byte does."""
    text = unicodedata.normalize("NFKC", str(text))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


class RunEncoder:
    """A run's configuration, vocabulary and towers. Safe to share between threads: the towers load once."""

    def __init__(self, run_dir: Path, device: str = "cpu"):
        from twotower_cli.data.vocab import Vocab
        from twotower_cli.model.config import ModelConfig
        from twotower_cli.model.files import fingerprint, read_config

        self.run_dir = Path(run_dir)
        self.device = device
        self.run_config = read_config(self.run_dir)
        self.config = ModelConfig(**self.run_config["model"])
        self.vocab = Vocab.load(self.run_dir / "vocab.json")
        if self.config.vocab_size != len(self.vocab):
            raise ArtifactError(f"{self.run_dir / 'vocab.json'}: {len(self.vocab)} entries but config.json says "
                                f"vocab_size {self.config.vocab_size}; the files come from different runs")
        self.fingerprint = fingerprint(self.run_dir)
        self.stamps = model_stamps(self.run_dir)
        self._lock = threading.Lock()
        self._torch = None  # (model) loaded on first need
        self._numpy = None
        self._verified = None

    # -- encoders -------------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.config.output_dim

    def uses_numpy(self) -> bool:
        return self.config.encoder == "ngram" and self.device == "cpu"

    def _numpy_towers(self):
        with self._lock:
            if self._numpy is None:
                from twotower_cli.model.files import mapped_tensors
                from twotower_cli.model.numpy_encoder import NumpyTowers

                path = self.run_dir / "model.safetensors"
                tensors = mapped_tensors(path)
                # The fingerprint check reads every weight: done once per file (like git's stat cache, a marker
                # records the file's size, time and inode when it matched), on the other core, while the query is
                # answered.
                vocab = self.vocab.to_json()
                if not Verification.known_good(path, self.config, vocab, self.fingerprint):
                    self._verified = Verification(path, tensors, self.config, vocab, self.fingerprint)
                self._numpy = NumpyTowers(self.config, tensors, str(path))
            return self._numpy

    def torch_model(self):
        with self._lock:
            if self._torch is None:
                from twotower_cli.model.artifacts import load_model

                self._torch, _, _ = load_model(self.run_dir, self.device)
            return self._torch

    def check_unchanged(self) -> None:
        """Refuse to encode with towers whose files were replaced or written since they were loaded: the weights
        in memory no longer match the run on disk (nor the indexes built from it)."""
        from twotower_cli.runs import stamp_or_none

        for path, stamp in self.stamps.items():
            if stamp_or_none(path) != stamp:
                raise ArtifactError(f"{path}: changed on disk since this model was loaded; load the run again "
                                    "(restart twotower serve)")

    def _encode(self, texts: Sequence[str], side: str, batch_size: int) -> np.ndarray:
        if isinstance(texts, str):
            raise UsageError("give a list of texts (a single string would be read as characters)")
        self.check_unchanged()
        texts = [clean(t) for t in texts]
        max_len = self.config.max_query_length if side == "query" else self.config.max_document_length
        parts = []
        for s in range(0, len(texts), max(1, batch_size)):
            ids = self.vocab.encode_list(texts[s:s + batch_size], max_len)
            if self.uses_numpy():
                parts.append(self._numpy_towers().encode(ids, side))
            else:
                import torch

                model = self.torch_model()
                with torch.no_grad():
                    t = torch.from_numpy(ids).to(self.device)
                    e = model.encode_queries(t) if side == "query" else model.encode_documents(t)
                parts.append(e.float().cpu().numpy())
        out = np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)
        if self._verified is not None:
            self._verified.check()
        if not np.isfinite(out).all():  # the towers, not an index: nothing is searched with such a vector
            raise ArtifactError(f"{self.run_dir / 'model.safetensors'}: gives non-finite {side} embeddings (NaN or "
                                "infinity); its weights are damaged: retrain, or restore the run from a copy")
        return out

    def query_lexical(self, texts: Sequence[str]):
        """The queries' exact lexical rows (`retrieval.lexical.SparseRows`), for an index that re-scores with them."""
        self.check_unchanged()
        ids = self.vocab.encode_list([clean(t) for t in texts], self.config.max_query_length)
        if self.uses_numpy():
            return self._numpy_towers().lexical_rows(ids, "query")
        import torch

        from twotower_cli.model.encode import lexical_rows

        return lexical_rows(self.torch_model(), torch.from_numpy(ids), "query", self.device)

    def encode_queries(self, texts: Sequence[str], batch_size: int = 1024) -> np.ndarray:
        """Query embeddings, float32 [len(texts), dim]."""
        return self._encode(texts, "query", batch_size)

    def encode_documents(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Document embeddings, float32 [len(texts), dim] (what an index stores)."""
        return self._encode(texts, "document", batch_size)

MODEL_FILES = ("config.json", "vocab.json", "model.safetensors", "encoder/model.safetensors", "encoder/config.json",
               "encoder/tokenizer.json", "encoder/vocab.txt")  # what the towers are built from


def model_stamps(run_dir: Path) -> dict:
    from twotower_cli.runs import stamp_or_none

    return {run_dir / f: stamp_or_none(run_dir / f) for f in MODEL_FILES if (run_dir / f).exists()}


class Verification:
    """The weights' fingerprint, computed in a thread (hashing releases the GIL) and checked before a result is
    returned: an altered model.safetensors is refused on the NumPy path too. Hashing every weight costs more than
    a search, so a marker beside the file records its weights' digest once verified, with the file's size, times
    and inode (like git's stat cache; the change time moves on any write, whatever the modification time says):
    while they hold, only the settings are checked again against the fingerprint (`model_fingerprint`)."""

    def __init__(self, path: Path, tensors: dict, cfg, vocab_json: dict, expected: str):
        self.path, self.error, self.done = path, None, threading.Event()
        threading.Thread(target=self.run, args=(tensors, cfg, vocab_json, expected), daemon=True).start()

    @staticmethod
    def stamp(path: Path) -> dict:
        st = path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}

    @staticmethod
    def marker(path: Path) -> Path:
        return path.parent / f".{path.name}.verified.json"

    @classmethod
    def known_good(cls, path: Path, cfg, vocab_json: dict, expected: str) -> bool:
        from twotower_cli.model.files import fingerprint_version, model_fingerprint
        from twotower_cli.runs import read_json_or

        known = read_json_or(cls.marker(path), {})
        weights = known.pop("weights", None)
        return known == cls.stamp(path) and isinstance(weights, str) and model_fingerprint(
            weights, cfg, vocab_json, fingerprint_version(path)) == expected

    def run(self, tensors, cfg, vocab_json, expected):
        try:
            from twotower_cli.model.files import fingerprint_version, model_fingerprint, numpy_weights_digest

            weights = numpy_weights_digest(tensors)
            if model_fingerprint(weights, cfg, vocab_json, fingerprint_version(self.path)) != expected:
                from twotower_cli.model.files import altered

                self.error = str(altered(self.path.parent))
            else:
                try:  # a read-only run: checked again next time
                    from twotower_cli.runs import atomic_write_json

                    atomic_write_json(self.marker(self.path), {**self.stamp(self.path), "weights": weights})
                except Exception:
                    pass
        except Exception as exc:  # pragma: no cover - reported below
            self.error = f"{self.path}: cannot be read ({exc})"
        finally:
            self.done.set()

    def check(self) -> None:
        self.done.wait()
        if self.error:
            raise ArtifactError(self.error)
