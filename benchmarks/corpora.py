"""Build the evaluation corpora of `benchmarks/quality.py` from text that ships in Debian and Python packages.

    python benchmarks/corpora.py [NAME ...] [--out benchmarks/out/corpora]

Each corpus is a folder in the layout the tool reads, like ../shared/data/debian-packages:
  train.parquet  query, document, label: every positive pair and one random negative (another pair's document)
  eval/          queries.parquet [query_id, query], corpus.parquet [doc_id, document] (every document, training
                 documents included as distractors), qrels.parquet [query_id, doc_id]
Queries held out for eval/ never appear in train.parquet. Exact duplicate documents and duplicate queries are
dropped (one kept), whitespace is normalised, and the split uses seed 13, as in the Debian set.

The corpora (chosen to differ in kind and size; none from man pages or WordNet, which an outside check keeps):
  foldoc    computing dictionary (Debian dict-foldoc): term -> definition            (~14k, definitional)
  jargon    the Jargon File (Debian dict-jargon): term -> definition                  (~2.2k, definitional)
  info      GNU/R/Octave/Guile/Python info manuals: node title -> node text            (~11k, lexical)
  pydoc     Python docstrings (the stdlib, numpy, networkx): qualified name(signature) -> docstring (~10k)
  debian-1k, debian-3k, debian-10k: Debian training pairs subsampled (a learning curve), each with 300, 500 or
            1,000 held-out queries searched over its own documents (what a user with that many pairs has)
Needs apt-get (download only, no install) and pip (download only); writes nothing outside --out.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))  # keep this folder (it holds a tokenize.py) off sys.path
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import ast
import gzip
import re
import subprocess
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
DEBIAN = ROOT.parent / "shared" / "data" / "debian-packages"
SEED = 13
INFO_PACKAGES = ["r-doc-info", "octave-doc", "guile-3.0-doc", "bash-doc", "m4", "flex", "automake",
                 "python3.11-doc", "coreutils", "grep", "sed", "findutils", "diffutils", "gettext-base", "wget",
                 "gzip", "bc", "gnupg", "ed", "time"]
PYDOC_WHEELS = ["numpy==2.4.6", "networkx==3.6.1"]


def norm(text: str) -> str:
    return re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n", text)).strip()


def debs(packages: list[str], into: Path) -> Path:
    """Download packages with apt-get and unpack them (no install)."""
    dl = into / "debs"
    dl.mkdir(parents=True, exist_ok=True)
    for p in packages:
        subprocess.run(["apt-get", "download", p], cwd=dl, check=True, capture_output=True)
    root = into / "root"
    for f in sorted(dl.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(f), str(root)], check=True)
    return root


# -- readers: each returns a list of (query, document) --------------------------------------------------------

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + B64.index(c)
    return n


def dictd(name: str, tmp: Path) -> list[tuple[str, str]]:
    root = debs([f"dict-{name}"], tmp)
    base = root / "usr/share/dictd" / name
    data = gzip.open(f"{base}.dict.dz").read()
    pairs = []
    for line in Path(f"{base}.index").read_text(encoding="utf-8").splitlines():
        head, off, size = line.split("\t")[:3]
        if head.startswith("00database") or len(head) < 2:
            continue
        body = data[b64(off):b64(off) + b64(size)].decode("utf-8", "replace")
        lines = body.split("\n")
        # the headword (and, in FOLDOC, its abbreviations) come first, then the indented definition
        start = next((i for i, ln in enumerate(lines) if ln.startswith((" ", "\t")) and ln.strip()), len(lines))
        text = "\n".join(ln.strip() for ln in lines[start:])
        text = re.sub(r"\(\d{4}-\d{2}-\d{2}\)\s*$", "", text.strip())  # FOLDOC's revision date
        text = text.replace("{", "").replace("}", "")
        text = re.sub(r"\s*\n\s*", " ", text)  # hard-wrapped paragraphs
        pairs.append((head.strip(), norm(text)))
    return pairs


def info(tmp: Path) -> list[tuple[str, str]]:
    root = debs(INFO_PACKAGES, tmp)
    pairs = []
    for path in sorted((root / "usr/share/info").rglob("*.info*.gz")):
        text = gzip.open(path).read().decode("utf-8", "replace")
        for node in text.split("\x1f")[1:]:
            m = re.match(r"\nFile: [^,]+,\s+Node: ([^,\n]+)[^\n]*\n", node)
            if not m:
                continue
            title = m.group(1).strip()
            body = node[m.end():]
            body = re.sub(r"\n\* Menu:.*", "", body, flags=re.S)  # the menu lists other nodes' titles
            # the heading repeats the title (with its section number): drop it and its underline
            body = re.sub(r"^\s*[^\n]*\n[*=\-.]{3,}[ \t]*\n", "", body, count=1)
            if title in ("Top",) or "Index" in title or re.search(r"<\d+>$", title) or len(body.strip()) < 80:
                continue
            pairs.append((title, norm(re.sub(r"\s*\n\s*", " ", body))))
    return pairs


def signature(args: ast.arguments) -> str:
    try:
        return ast.unparse(args)
    except Exception:
        return "..."


def docstrings(source: str, module: str) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []

    def visit(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name.startswith("_") and child.name != "__init__":
                    continue
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc and len(doc) >= 40:
                    sig = f"({signature(child.args)})" if not isinstance(child, ast.ClassDef) else ""
                    out.append((f"{name}{sig}", norm(doc)))
                if isinstance(child, ast.ClassDef):
                    visit(child, name)

    visit(tree, module)
    return out


def pydoc(tmp: Path) -> list[tuple[str, str]]:
    pairs = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if rel.parts[0] in ("test", "idlelib", "site-packages", "lib2to3", "turtledemo") or "tests" in rel.parts:
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        pairs += docstrings(path.read_text(encoding="utf-8", errors="replace"), module)
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "-d",
                    str(wheels), *PYDOC_WHEELS], check=True)
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            for name in sorted(z.namelist()):
                if not name.endswith(".py") or "/tests/" in name or "/testing/" in name:
                    continue
                module = name[:-3].replace("/", ".").removesuffix(".__init__")
                pairs += docstrings(z.read(name).decode("utf-8", "replace"), module)
    return pairs


# -- writing ----------------------------------------------------------------------------------------------------

def write_corpus(pairs: list[tuple[str, str]], out: Path, n_eval: int, limit: int | None = None) -> dict:
    df = pl.DataFrame(pairs, schema=["query", "document"], orient="row")
    df = df.filter(pl.col("query").str.len_chars() > 0, pl.col("document").str.len_chars() >= 40)
    df = df.unique("document", keep="first", maintain_order=True).unique("query", keep="none", maintain_order=True)
    rng = np.random.default_rng(SEED)
    df = df[rng.permutation(df.height)]
    if limit:
        df = df.head(limit)
    ev, tr = df.head(n_eval), df.slice(n_eval)
    documents = df["document"]
    doc_id = {d: f"d{i}" for i, d in enumerate(documents.to_list())}
    neg = tr["document"][rng.permutation(tr.height)]
    same = (neg == tr["document"]).to_numpy()
    neg = pl.Series(np.where(same, np.roll(neg.to_numpy(), 1), neg.to_numpy()))
    train = pl.concat([tr.with_columns(label=pl.lit(1, pl.Int64)),
                       tr.select("query", document=neg).with_columns(label=pl.lit(0, pl.Int64))])
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(exist_ok=True)
    train.write_parquet(out / "train.parquet")
    ev = ev.with_columns(query_id=pl.format("q{}", pl.int_range(pl.len())))
    ev.select("query_id", "query").write_parquet(out / "eval" / "queries.parquet")
    ev.select("query_id", doc_id=pl.col("document").replace_strict(doc_id)).write_parquet(out / "eval" / "qrels.parquet")
    pl.DataFrame({"doc_id": list(doc_id.values()), "document": list(doc_id)}).write_parquet(out / "eval" / "corpus.parquet")
    return {"train_pairs": tr.height, "eval_queries": ev.height, "documents": len(doc_id)}


def debian_subset(n: int, n_eval: int, out: Path) -> dict:
    """``n`` training pairs and ``n_eval`` held-out queries of the Debian pairs, searched over their own
    ``n + n_eval`` documents: what a user with that many pairs has."""
    pos = pl.read_parquet(DEBIAN / "train.parquet").filter(pl.col("label") == 1)
    pairs = pos[np.random.default_rng(SEED).permutation(pos.height)[:n + n_eval]].select("query", "document")
    return write_corpus(list(pairs.iter_rows()), out, n_eval)


BUILDERS = {
    "foldoc": lambda out, tmp: write_corpus(dictd("foldoc", tmp), out, 1000),
    "jargon": lambda out, tmp: write_corpus(dictd("jargon", tmp), out, 300),
    "info": lambda out, tmp: write_corpus(info(tmp), out, 1000),
    "pydoc": lambda out, tmp: write_corpus(pydoc(tmp), out, 1000, limit=11000),
    "debian-1k": lambda out, tmp: debian_subset(1000, 300, out),
    "debian-3k": lambda out, tmp: debian_subset(3000, 500, out),
    "debian-10k": lambda out, tmp: debian_subset(10000, 1000, out),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=list(BUILDERS), help=f"corpora to build: {', '.join(BUILDERS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "corpora")
    args = ap.parse_args()
    for name in args.names:
        with tempfile.TemporaryDirectory() as tmp:
            stats = BUILDERS[name](args.out / name, Path(tmp))
        print(f"{name:12s} " + "  ".join(f"{k} {v:,}" for k, v in stats.items()), flush=True)


if __name__ == "__main__":
    main()
