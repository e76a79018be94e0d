"""Saving and loading models and checkpoints: safetensors for tensors, JSON for everything else.

Nothing here unpickles: a model is rebuilt from `config.json` and `vocab.json`, then given its weights.
A resumable checkpoint is one safetensors file whose metadata holds the training state as JSON, so model,
optimizer and counters are replaced together by one atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from twotower_cli import __version__
from twotower_cli.data.vocab import Vocab
from twotower_cli.errors import ArtifactError
from twotower_cli.model.config import ModelConfig
from twotower_cli.model.files import (FINGERPRINT_VERSION, FORMAT_VERSION, altered, fingerprint_version,
                                      header_metadata, model_fingerprint, read_config)
from twotower_cli.model.towers import TwoTower
from twotower_cli.runs import atomic_write_bytes, atomic_write_json


def versions() -> dict[str, str]:
    import numpy
    import polars

    return {"twotower": __version__, "torch": torch.__version__, "polars": polars.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def write_config(run_dir: Path, model_cfg: ModelConfig, settings: dict, extra: dict | None = None) -> None:
    atomic_write_json(run_dir / "config.json", {"format_version": FORMAT_VERSION, "model": model_cfg.to_dict(),
                                                "settings": settings, "versions": versions(), **(extra or {})})


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


HALF_FROM = 1 << 20  # embedding tables of at least this many values are stored in float16


def stored(name: str, t: torch.Tensor) -> torch.Tensor:
    """The tensor as model.safetensors keeps it: large embedding tables in float16 (half the disk, and what a query
    reads; their values, ~N(0, 0.1), keep three significant digits), everything else as it is. Loading casts back;
    the run's index and every choice made on validation use the saved model, so all agree."""
    if name.endswith((".bag.weight", ".emb.weight")) and t.dtype == torch.float32 and t.numel() >= HALF_FROM:
        return t.half()
    return t


ENCODER = "transformer.model."  # a transformer's own weights: kept in the run's encoder/ folder


def new_model(cfg: ModelConfig, vocab: Vocab, folder: Path | None = None) -> TwoTower:
    """A model of ``cfg``; a transformer's is built from a model ``folder`` (with its weights when it has them)."""
    if cfg.encoder != "transformer":
        return TwoTower(cfg)
    from twotower_cli.model.transformer import TransformerEncoder

    return TwoTower(cfg, TransformerEncoder(Path(folder), cfg, vocab.chars))


def save_model(run_dir: Path, model: torch.nn.Module) -> str:
    """Write model.safetensors atomically (a transformer's own weights: encoder/model.safetensors, a folder that
    transformers and sentence-transformers load). Its metadata carries a fingerprint of every weight, the model's
    settings and the vocabulary, which indexes record (searching with another model is refused) and loading
    checks (an altered file is refused)."""
    everything = {k: stored(k, v.detach().cpu().contiguous()) for k, v in sorted(model.weights().items())}
    tensors = {k: v for k, v in everything.items() if not k.startswith(ENCODER)}
    vocab = Vocab.load(Path(run_dir) / "vocab.json").to_json()  # (written first, when the run folder is made)
    digest = model_fingerprint(weights_digest(everything), model.cfg, vocab)
    if model.transformer is not None:
        model.transformer.save(Path(run_dir) / "encoder", atomic_write_bytes)
    meta = {"format": "twotower", "format_version": str(FORMAT_VERSION), "fingerprint": digest,
            "fingerprint_version": str(FINGERPRINT_VERSION)}
    atomic_write_bytes(Path(run_dir) / "model.safetensors", st_save(tensors, metadata=meta))
    return digest


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; the run folder is incomplete (was training interrupted?)") from None
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise ArtifactError(f"{path}: not a valid safetensors file ({exc}); it is truncated or corrupt") from None
    return tensors, header_metadata(path)


def read_model_tensors(run_dir: Path, transformer: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every weight of a saved model (a transformer's from encoder/ too, named as in the model) and the metadata
    of model.safetensors."""
    tensors, meta = read_tensors(Path(run_dir) / "model.safetensors")
    if transformer:
        encoder, _ = read_tensors(Path(run_dir) / "encoder" / "model.safetensors")
        tensors.update({ENCODER + k: v for k, v in encoder.items()})
    return tensors, meta


def load_weights(model: TwoTower, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.weights()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{path}: weights do not match config.json (missing {missing[:3]}, unexpected "
                            f"{extra[:3]}); the files come from different models")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ArtifactError(f"{path}: weight '{name}' has shape {tuple(t.shape)} but config.json implies "
                                f"{tuple(expected[name].shape)}; the files come from different models")
    model.load_weights(tensors)


def load_model(run_dir: Path, device="cpu") -> tuple[TwoTower, Vocab, dict]:
    """Rebuild a model from its run folder alone: config.json + vocab.json + model.safetensors."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    vocab = Vocab.load(run_dir / "vocab.json")
    mcfg = ModelConfig(**cfg["model"])
    if mcfg.vocab_size != len(vocab):
        raise ArtifactError(f"{run_dir / 'vocab.json'}: {len(vocab)} entries but config.json says vocab_size "
                            f"{mcfg.vocab_size}; the files come from different runs")
    model = new_model(mcfg, vocab, run_dir / "encoder")
    path = run_dir / "model.safetensors"
    tensors, meta = read_model_tensors(run_dir, model.transformer is not None)
    if meta.get("fingerprint") and model_fingerprint(weights_digest(tensors), mcfg, vocab.to_json(),
                                                     fingerprint_version(path)) != meta["fingerprint"]:
        raise altered(run_dir)
    load_weights(model, tensors, path)
    return model.to(device).eval(), vocab, cfg


# -- resumable checkpoints -------------------------------------------------------------------------------------

def optimizer_tensors(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict, info: dict) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith(prefix + "."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = t
    for name, value in info["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_checkpoint(path: Path, model, optimizers: dict[str, torch.optim.Optimizer], state: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.weights().items()}
    info = {}
    for name, opt in optimizers.items():
        t, i = optimizer_tensors(f"optim_{name}", opt)
        tensors.update(t)
        info[name] = i
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"format": "twotower-checkpoint", "format_version": str(FORMAT_VERSION),
            "state": json.dumps(state), "optimizers": json.dumps(info)}
    atomic_write_bytes(Path(path), st_save(tensors, metadata=meta))


def load_checkpoint(path: Path, model, optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    tensors, meta = read_tensors(path)
    try:
        state = json.loads(meta["state"])
        info = json.loads(meta["optimizers"])
        weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        load_weights(model, weights, path)
        for name, opt in optimizers.items():
            restore_optimizer(f"optim_{name}", opt, tensors, info[name])
        torch.set_rng_state(tensors["rng.torch"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: checkpoint is incomplete or altered ({type(exc).__name__}: {exc})") from None
    return state
