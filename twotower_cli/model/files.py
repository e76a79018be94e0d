"""Reading a saved model without torch: its configuration, the header of its safetensors file (the fingerprint),
and its tensors as read-only NumPy arrays mapped from the file (only the rows a query touches are read).

Nothing here unpickles: safetensors is a JSON header followed by raw little-endian arrays."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from twotower_cli.errors import ArtifactError
from twotower_cli.model.config import ModelConfig
from twotower_cli.runs import read_json

FORMAT_VERSION = 1
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "F64": np.float64, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_config(run_dir: Path) -> dict:
    """`config.json` of a run, checked: its format version, and a 'model' section whose every value has the type
    the model expects (a damaged file is an error naming it, never a failure later)."""
    path = Path(run_dir) / "config.json"
    cfg = read_json(path, "model configuration")
    version = cfg.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactError(f"{path}: format_version is {version!r}, not a number; the file is corrupt")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {version} is newer than this twotower understands "
                            f"({FORMAT_VERSION}); upgrade twotower (pip install -U twotower-cli)")
    model = cfg.get("model")
    try:
        if not isinstance(model, dict):
            raise TypeError("missing or not an object")
        ModelConfig(**model)
        for key, default in ModelConfig().to_dict().items():
            value = model.get(key, default)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float) \
                else isinstance(value, type(default))
            if not ok or (isinstance(default, int) and not isinstance(default, bool) and isinstance(value, bool)):
                raise TypeError(f"{key} is {value!r}")
            if isinstance(default, (int, float)) and not isinstance(default, bool) and not 0 <= value < math.inf:
                raise TypeError(f"{key} is {value!r}, not a finite number of at least 0")  # (NaN too)
    except TypeError as exc:
        raise ArtifactError(f"{path}: 'model' section is invalid ({exc}); the file is corrupt") from None
    return cfg


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and its length in bytes; ValueError when it cannot be one."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if not 0 < n < 100_000_000:
            raise ValueError("bad header length")
        return json.loads(fh.read(n)), n


def header_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading its header only (not the tensors)."""
    try:
        header, _ = read_header(path)
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("bad metadata")
        return meta
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; the run folder is incomplete (was training interrupted?)") from None
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise ArtifactError(f"{path}: header is corrupt or not a twotower file; retrain or restore it") from None


def fingerprint(run_dir: Path) -> str:
    """The fingerprint stored in model.safetensors' header (reads the header only)."""
    path = Path(run_dir) / "model.safetensors"
    if not path.exists():
        raise ArtifactError(f"{path}: missing; the run has no trained model yet")
    digest = header_metadata(path).get("fingerprint")
    if not digest:
        raise ArtifactError(f"{path}: header is corrupt or not a twotower model; retrain or restore the file")
    return digest


IN_MEMORY_UP_TO = 64 << 20  # files up to this size are read whole, not mapped: one truncated in place under a
# reader cannot stop the process (SIGBUS). Larger ones are mapped; twotower only ever replaces them by a rename.


def load_npy(path: Path) -> np.ndarray:
    """A read-only array from a .npy file (read whole or mapped, see IN_MEMORY_UP_TO); ``ValueError`` when it is
    not a plain array file, never NumPy's advice to unpickle it."""
    path = Path(path)
    small = path.stat().st_size <= IN_MEMORY_UP_TO
    try:
        array = np.load(path, mmap_mode=None if small else "r", allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc) or "Python objects" in str(exc):
            raise ValueError("not a plain array file (header damaged)") from None
        raise
    if small:
        array.flags.writeable = False
    return array


def mapped_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only array (nothing decoded): mapped from the file, or read
    whole when it is small (see IN_MEMORY_UP_TO)."""
    path = Path(path)
    try:
        header, n = read_header(path)
        size = path.stat().st_size
        data = path.read_bytes() if size <= IN_MEMORY_UP_TO else None
        if data is not None and len(data) != size:
            raise ValueError("the file changed while it was read")
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = DTYPES.get(info["dtype"])
            start, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if dtype is None or 8 + n + end > size or end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise ValueError(f"tensor {name} is out of the file or of an unknown type")
            if end == start:
                out[name] = np.zeros(shape, dtype=dtype)
            elif data is not None:
                out[name] = np.frombuffer(data, dtype, int(np.prod(shape)), 8 + n + start).reshape(shape)
            else:
                out[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape)
        return out
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; the run folder is incomplete (was training interrupted?)") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not a valid safetensors file ({exc}); it is truncated or corrupt") from None


FINGERPRINT_VERSION = 2  # 2: the weights, config.json's model section and vocab.json (1: weights, lexical weights)


def fingerprint_version(path: Path) -> int:
    """How the fingerprint in a model file's header was computed (header only)."""
    value = header_metadata(path).get("fingerprint_version", "1")
    return int(value) if str(value).isdigit() else 0


def model_fingerprint(weights: str, cfg: ModelConfig, vocab_json: dict, version: int = FINGERPRINT_VERSION) -> str:
    """The model's fingerprint from its weights' sha256: with everything else that shapes its embeddings, the model
    settings and the vocabulary, so that an edit of config.json or vocab.json is noticed as an altered weight is."""
    if version < 2:
        from twotower_cli.compat import fingerprint_v1

        return fingerprint_v1(weights, cfg)
    text = json.dumps({"model": cfg.to_dict(), "vocab": vocab_json}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256((weights + text).encode("utf-8")).hexdigest()


def altered(run_dir: Path) -> ArtifactError:
    return ArtifactError(f"{Path(run_dir) / 'model.safetensors'}: does not match its recorded fingerprint: the "
                         "weights, config.json's model settings or vocab.json were altered or damaged. Retrain, "
                         "or restore the run from a copy")


def numpy_weights_digest(tensors: dict[str, np.ndarray]) -> str:
    """The sha256 of a model file's tensors mapped from it, as ``artifacts.weights_digest`` computes it."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(memoryview(np.ascontiguousarray(tensors[name])).cast("B"))
    return h.hexdigest()
