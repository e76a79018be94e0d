"""A pretrained Hugging Face encoder (BERT family: MiniLM, BGE, E5, ...) as the learned half of both towers
(`train --base-model`). It reads the text the character vocabulary keeps (so that it goes through the same token
rows as every other model: batches, workers, resume, torchrun), tokenised by its own tokenizer, pooled as its
folder says (a sentence-transformers folder: modules.json and 1_Pooling; a plain transformers folder: the mean).

The run keeps the fine-tuned encoder as a standard model folder (`encoder/`: config.json, model.safetensors,
tokenizer files, modules.json, pooling), which transformers and sentence-transformers load by path. Weights are
read from safetensors only: a folder with only a pickled `pytorch_model.bin` is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
from torch import nn

from twotower_cli.errors import UsageError

INSTALL = "pip install -e '.[hf]'"  # the extra that brings transformers
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "merges.txt",
                   "sentencepiece.bpe.model", "spiece.model", "added_tokens.json")
HUB = ("huggingface.co", 443)
INFERENCE_BATCH = 64  # texts embedded at a time without gradients, sorted by length (little padding)
MEMO_LIMIT = 500_000  # embeddings remembered between passes over the same texts (~0.8 GB at 384 dimensions)


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UsageError(f"--base-model needs the transformers library: {INSTALL}") from None
    transformers.logging.set_verbosity_error()  # its warnings are about its own defaults, not the user's data
    transformers.logging.disable_progress_bar()  # (stderr is twotower's: one line per problem)
    return transformers


def resolve(name: str) -> Path:
    """The folder of a base model: ``name`` itself when it is a folder, else the hub model of that name from the
    local cache, downloaded when the hub can be reached (checked first, in seconds, so a closed network never
    hangs)."""
    transformers_module()  # (the install line first: nothing below can be used without it)
    path = Path(name).expanduser()
    if path.is_dir():
        check_folder(path)
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"--base-model {name}: no such folder; give a model folder (config.json, model.safetensors, "
                         "tokenizer files) or a Hugging Face model name")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*"]
    try:
        return check_folder(Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True)))
    except UsageError:
        raise
    except Exception:  # not in the cache: download it, if the hub answers
        pass
    try:
        socket.create_connection(HUB, timeout=3).close()
    except OSError:
        raise UsageError(f"--base-model {name}: not in the local Hugging Face cache, and {HUB[0]} cannot be reached "
                         "from here; download the model elsewhere and pass its folder") from None
    try:
        return check_folder(Path(snapshot_download(name, allow_patterns=patterns)))
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"--base-model {name}: cannot download it ({type(exc).__name__}); check the name, or pass "
                         "a model folder") from None


def check_folder(folder: Path) -> Path:
    for needed in ("config.json",):
        if not (folder / needed).is_file():
            raise UsageError(f"--base-model {folder}: not a model folder (no {needed}); give the folder that holds "
                             "config.json, model.safetensors and the tokenizer files")
    if not (folder / "model.safetensors").is_file():
        pickled = (folder / "pytorch_model.bin").is_file()
        raise UsageError(f"--base-model {folder}: no model.safetensors" + (
            " (only pytorch_model.bin, a pickle, which twotower never loads; convert it to safetensors)" if pickled
            else "; the weights must be a safetensors file"))
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"--base-model {folder}: no tokenizer files (tokenizer.json or vocab.txt); the folder is "
                         "incomplete")
    return folder


def weights_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pooling_of(folder: Path) -> tuple[str, int]:
    """The pooling a sentence-transformers folder declares (mean, cls or max) and its maximum sequence length;
    for a plain transformers folder: mean pooling and 0 (the model's own limit)."""
    mode, length = "mean", 0
    try:
        modules = json.loads((folder / "modules.json").read_text())
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                cfg = json.loads((folder / m.get("path", "1_Pooling") / "config.json").read_text())
                mode = "cls" if cfg.get("pooling_mode_cls_token") else "max" if cfg.get("pooling_mode_max_tokens") \
                    else "mean"
        length = int(json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return mode, length


def hidden_size(folder: Path) -> int:
    cfg = json.loads((folder / "config.json").read_text())
    size = cfg.get("hidden_size") or cfg.get("d_model") or cfg.get("dim")
    if not isinstance(size, int):
        raise UsageError(f"--base-model {folder}: config.json names no hidden_size; twotower takes encoder models "
                         "of the BERT family (BERT, MiniLM, BGE, E5, RoBERTa, ...)")
    return size


class TransformerEncoder(nn.Module):
    """The learned half of both towers: a Hugging Face encoder, its tokenizer and its pooling. Reads token rows of
    the character vocabulary back as text (``chars``: the vocabulary's characters in id order)."""

    def __init__(self, folder: Path, cfg, chars: list[str]):
        super().__init__()
        transformers = transformers_module()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # (fork-safe under DataLoader workers)
        if (Path(folder) / "model.safetensors").is_file():  # the base model, or a run's own weights
            self.model = transformers.AutoModel.from_pretrained(str(folder), use_safetensors=True)
        else:  # a run resumed before its first save: the architecture, its weights from the checkpoint
            self.model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(str(folder)))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        self.pooling = cfg.pooling
        self.max_tokens = {"query": cfg.max_query_tokens, "document": cfg.max_document_tokens}
        # code point of each token id: 0 (padding) is dropped, 1 (unknown) reads as a space
        self.codepoints = np.array([0, 32] + [ord(c) for c in chars], dtype=np.uint32)
        self.memo: dict[tuple[str, str], torch.Tensor] = {}

    def texts(self, ids: torch.Tensor) -> list[str]:
        cps = self.codepoints[ids.cpu().numpy()]
        return [row.tobytes().decode("utf-32-le").replace("\x00", "") for row in cps]

    def forward(self, ids: torch.Tensor, side: str) -> torch.Tensor:
        """Pooled embeddings [B, hidden] of token rows of the character vocabulary. Without gradients (validation,
        indexing, search) texts are embedded in batches of similar length, and remembered until the weights
        change (`forget`): training's last validation, the choices and the default index embed the documents
        once, not three times."""
        texts = self.texts(ids)
        if torch.is_grad_enabled():
            return self.pooled(texts, side, ids.device)
        out = [self.memo.get((side, t)) for t in texts]
        todo = [i for i, e in enumerate(out) if e is None]
        if todo:
            by_length = sorted(todo, key=lambda i: len(texts[i]))
            for s in range(0, len(by_length), INFERENCE_BATCH):
                part = by_length[s:s + INFERENCE_BATCH]
                for i, e in zip(part, self.pooled([texts[i] for i in part], side, ids.device)):
                    out[i] = e
                    if len(self.memo) < MEMO_LIMIT:
                        self.memo[(side, texts[i])] = e
        return torch.stack(out) if out else torch.zeros(0, self.model.config.hidden_size, device=ids.device)

    def forget(self) -> None:
        self.memo.clear()

    def pooled(self, texts: list[str], side: str, device) -> torch.Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens[side],
                               return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(mask == 0, float("-inf")).amax(1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def save(self, folder: Path, write_bytes) -> None:
        """The encoder as a model folder that transformers and sentence-transformers load by path: its config
        and tokenizer (written once, `copy_model_files`) and its weights (written with ``write_bytes``, atomic)."""
        from safetensors.torch import save

        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        write_bytes(Path(folder) / "model.safetensors", save(state, metadata={"format": "pt"}))


def tokenizer_report(folder: Path, texts: list[str] | None, max_tokens: int, top: int = 40) -> dict:
    """A run's tokenizer: its size and special tokens, its most frequent tokens in ``texts`` (else its first
    ones), and for ``texts`` the share of unknown tokens and of texts cut at ``max_tokens``."""
    tokenizer = transformers_module().AutoTokenizer.from_pretrained(str(folder))
    out = {"size": len(tokenizer), "unknown_token": tokenizer.unk_token,
           "special": sorted(set(tokenizer.all_special_tokens)), "max_tokens": max_tokens}
    if not texts:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        out["tokens"] = [{"id": i, "token": t, "count": None} for t, i in vocab[: top or None]]
        return out
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    counts = np.bincount(np.concatenate([np.asarray(r, dtype=np.int64) for r in ids] + [np.zeros(0, np.int64)]),
                         minlength=len(tokenizer))
    total = int(counts.sum()) or 1
    order = np.argsort(-counts, kind="stable")[: top or None]
    out["tokens"] = [{"id": int(i), "token": tokenizer.convert_ids_to_tokens(int(i)), "count": int(counts[i])}
                     for i in order if counts[i]]
    unk = tokenizer.unk_token_id
    out["data"] = {"tokens": total, "unknown_rate": float(counts[unk]) / total if unk is not None else 0.0,
                   "cut_rate": float(np.mean([len(r) + 2 > max_tokens for r in ids])),
                   "mean_tokens": total / max(len(ids), 1)}
    return out


def copy_model_files(base: Path, folder: Path, cfg) -> None:
    """A run's `encoder/` folder before its weights: the base model's config and tokenizer files, and the
    sentence-transformers description of the whole (transformer, pooling, normalisation)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json",) + TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, folder / name)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": cfg.embedding_dim, "pooling_mode_cls_token": cfg.pooling == "cls",
        "pooling_mode_mean_tokens": cfg.pooling == "mean", "pooling_mode_max_tokens": cfg.pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": cfg.max_document_tokens, "do_lower_case": False}, indent=2))
