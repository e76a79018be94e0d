"""The character vocabulary: id 0 = padding, 1 = unknown, then characters by frequency.

Encoding a whole column is vectorised: Polars pads every string to the same length, the column becomes one
UTF-32 buffer, and a lookup table maps code points to ids. No Python loop runs per character.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twotower_cli.errors import ArtifactError

PAD, UNK = 0, 1
FORMAT_VERSION = 1
MAX_CODEPOINT = 0x10FFFF


@dataclass
class Vocab:
    chars: list[str]  # chars[i] has id i + 2
    counts: list[int]
    lowercase: bool = True

    def __post_init__(self):
        cps = np.array([ord(c) for c in self.chars], dtype=np.int64)
        # one entry per possible code point (4.4 MB): encoding is then a single lookup, no bounds pass
        self._table = np.full(MAX_CODEPOINT + 1, UNK, dtype=np.int32)
        self._table[cps] = np.arange(2, len(cps) + 2, dtype=np.int32)
        self._table[0] = PAD  # NUL is the padding character; real NULs in text are replaced before lookup

    def __len__(self) -> int:
        return len(self.chars) + 2

    # -- building ---------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, columns, min_freq: int = 1, max_size: int = 2000, lowercase: bool = True) -> "Vocab":
        """Count characters of Polars string Series; keep those seen ``min_freq`` times, most frequent first."""
        counts = np.zeros(MAX_CODEPOINT + 1, dtype=np.int64)
        for s in columns:
            counts += codepoint_counts(prepare(s, lowercase))
        return cls.from_counts(counts, min_freq, max_size, lowercase)

    @classmethod
    def from_counts(cls, counts: np.ndarray, min_freq: int = 1, max_size: int = 2000, lowercase: bool = True):
        """The vocabulary of code point counts [MAX_CODEPOINT + 1] (of texts lowercased as ``lowercase`` says)."""
        counts = counts.copy()
        counts[0] = 0  # NUL never becomes a vocabulary entry (it is the padding value internally)
        seen = np.flatnonzero(counts >= max(min_freq, 1))
        order = seen[np.lexsort((seen, -counts[seen]))][: max(max_size - 2, 0)]
        return cls([chr(c) for c in order], [int(counts[c]) for c in order], lowercase)

    # -- encoding ---------------------------------------------------------------------------------------------
    def encode(self, series, max_len: int) -> np.ndarray:
        """Encode a Polars string Series into an int32 array [rows, max_len], padded with 0."""
        return self.encode_prepared(self.prepare_texts(series, max_len), max_len)

    def prepare_texts(self, series, max_len: int):
        """The text part of encoding: cut to ``max_len`` characters, lowercased. Tokenising on demand keeps texts
        in this form so that each step does only the rest."""
        s = series.fill_null("").str.slice(0, max_len)  # cut first: lowercasing the whole text is wasted work
        if self.lowercase:
            s = s.str.to_lowercase().str.slice(0, max_len)
        return s.str.replace_all("\x00", "\ufffd", literal=True)  # NUL pads below: a real one becomes U+FFFD

    def encode_list(self, texts: list[str], max_len: int) -> np.ndarray:
        """``encode`` for a list of Python strings, without Polars (the query path imports neither it nor torch).
        Same steps: NFKC happens before (as when reading files), cut, lowercase, cut, NUL as padding."""
        return self._table[self.codepoints_list(texts, max_len)]

    def codepoints_list(self, texts: list[str], max_len: int) -> np.ndarray:
        """Code points [rows, max_len] (uint32) of Python strings prepared as `prepare_texts` prepares a Series,
        padded with NUL: the ids are a lookup away (`table`). Faster than the Polars way for a batch's rows, which
        is what tokenising on demand encodes."""
        if not texts:
            return np.zeros((0, max_len), dtype=np.uint32)
        cut = [(t or "")[:max_len] for t in texts]  # a null (None) is an empty text, as in prepare_texts
        if self.lowercase:
            cut = [t.lower()[:max_len] for t in cut]
        joined = "".join(t.replace("\x00", "\ufffd").ljust(max_len, "\x00") for t in cut)
        return np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).reshape(len(texts), max_len)

    def encode_prepared(self, series, max_len: int) -> np.ndarray:
        return self._table[codepoints_padded(series, max_len)]

    def table(self) -> np.ndarray:
        """Code point -> id, for looking ids up where the code points are (on a GPU: the tokens' destination)."""
        return self._table

    def encode_text(self, text: str, max_len: int) -> np.ndarray:
        import polars as pl

        return self.encode(pl.Series([text]), max_len)[0]

    def decode(self, ids) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == PAD:
                continue
            out.append(self.chars[i - 2] if i >= 2 else "\ufffd")
        return "".join(out)

    def unknown_rate(self, series) -> tuple[float, list[tuple[str, int]]]:
        """Share of characters (untruncated) that map to the unknown id, and the most frequent of them."""
        counts = codepoint_counts(prepare(series, self.lowercase))
        total = int(counts.sum())
        if total == 0:
            return 0.0, []
        # known = an id of its own (>= 2); NUL (padding) counts as unknown
        unknown = np.where(self._table[: counts.size] < 2, counts, 0)
        values = np.flatnonzero(unknown)
        top = sorted(zip(values.tolist(), unknown[values].tolist()), key=lambda x: (-x[1], x[0]))[:20]
        return int(unknown.sum()) / total, [(chr(c), k) for c, k in top]

    # -- saving -----------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, "pad_id": PAD, "unk_id": UNK, "lowercase": self.lowercase,
                "size": len(self),
                "chars": [{"id": i + 2, "char": c, "count": n}
                          for i, (c, n) in enumerate(zip(self.chars, self.counts))]}

    @classmethod
    def from_json(cls, obj: dict, where: str = "vocab.json") -> "Vocab":
        try:
            if obj.get("format_version", 0) > FORMAT_VERSION:
                raise ArtifactError(f"{where}: vocabulary format {obj['format_version']} is newer than this "
                                    f"twotower understands ({FORMAT_VERSION}); upgrade twotower")
            entries = sorted(obj["chars"], key=lambda e: e["id"])
            if [e["id"] for e in entries] != list(range(2, len(entries) + 2)):
                raise ArtifactError(f"{where}: character ids are not contiguous from 2; the file was altered")
            chars = [e["char"] for e in entries]
            if any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
                raise ArtifactError(f"{where}: entries must be distinct single characters; the file was altered")
            return cls(chars, [int(e["count"]) for e in entries], bool(obj["lowercase"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"{where}: not a twotower vocabulary ({type(exc).__name__}: {exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        path = Path(path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactError(f"{path}: missing; the run folder is incomplete") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{path}: not valid JSON ({exc}); the file is corrupt") from None
        return cls.from_json(obj, str(path))


def prepare(series, lowercase: bool):
    s = series.fill_null("")
    return s.str.to_lowercase() if lowercase else s


def codepoint_counts(series, rows: int = 8192) -> np.ndarray:
    """How often each code point occurs in a string Series, [MAX_CODEPOINT + 1] int64. Counted a slice of rows at
    a time: the whole column as one string, then as 8-byte code points, took 3.5 GB for 225k Debian pairs."""
    counts = np.zeros(MAX_CODEPOINT + 1, dtype=np.int64)
    for start in range(0, len(series), rows):
        text = "".join(series.slice(start, rows).to_list())
        counts += np.bincount(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), minlength=counts.size)
    return counts


def codepoints_padded(series, max_len: int) -> np.ndarray:
    """Code points [rows, max_len] (uint32) of strings already cut to max_len, padded with NUL."""
    import polars as pl

    if len(series) == 0:
        return np.zeros((0, max_len), dtype=np.uint32)
    joined = pl.select(series.str.pad_end(max_len, "\0").str.join("")).item()
    return np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).reshape(len(series), max_len)


INVISIBLE = {"Cc", "Cf", "Zs", "Zl", "Zp"}  # control and format characters (NUL, zero-width space), separators


def blank(text: str) -> bool:
    """True when a text has nothing to search for: white space, control and format characters only (a query of
    zero-width spaces or NULs passed a plain ``strip()`` check and was searched as if it said something)."""
    return all(c.isspace() or unicodedata.category(c) in INVISIBLE for c in text)


def visible(char: str) -> str:
    """How to show a character in a table: whitespace and control characters as visible marks."""
    marks = {" ": "␠", "\t": "⇥ (tab)", "\n": "↵ (newline)", "\r": "␍ (return)", "\u00a0": "⍽ (nbsp)"}
    if char in marks:
        return marks[char]
    if unicodedata.category(char)[0] in "CZ":
        return f"U+{ord(char):04X}"
    return char


def describe(char: str) -> tuple[str, str]:
    return unicodedata.name(char, f"U+{ord(char):04X}"), unicodedata.category(char)
