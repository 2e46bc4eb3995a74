"""English prose that ships with Python itself: sentences from the standard library's docstrings and
its interactive help text, for distilling a text model offline (no download, no labels).

Source: every ``.py`` file of the running interpreter's standard library (test packages and
site-packages excluded), read with `ast` (nothing is imported or executed): the docstrings of
modules, classes and functions, plus the help topics of ``pydoc_data/topics.py`` (the text
``help()`` shows for keywords and language topics). Each text splits into paragraphs (blank lines);
paragraphs that look like code, tables or lists (indented lines, ``>>>``, bullets) are dropped;
the rest split into sentences, kept when they read as plain prose:

- 5 to 40 words, starting with a capital letter, ending with ``.``, ``!`` or ``?``;
- no code punctuation (``_ = ( ) [ ] { } < > * ` | # @ \\ /``), no dotted names (``os.path``);
- at least 85% of the words plain words (letters, an apostrophe or hyphen, trailing punctuation).

Sentences are deduplicated (case-insensitive) and sorted, so the pool depends only on the Python
version (recorded by `describe`); `split` draws disjoint, seeded training and held-out sets from it,
never containing a sentence of the benchmark's own calibration or evaluation text. `tokenize` pads
them to the zoo MiniLM's sequence length with its own tokenizer and drops the few that would not
fit. The text is about Python, not daily life: real, varied English syntax and vocabulary, from a
different domain than the evaluation sentences.
"""

from __future__ import annotations

import ast
import re
import sys
import sysconfig
from pathlib import Path

import numpy as np

MIN_WORDS, MAX_WORDS = 5, 40
PLAIN_SHARE = 0.85

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "ensurepip"}
_CODE = re.compile(r"[_=()\[\]{}<>*`|#@\\/]|\w\.\w|\.\.|:$")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[.,;:!?]?$")
_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|[-*+] |\d+[.)] |:\w|\.\. )")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _texts(root: Path):
    """Every docstring of the standard library's modules, and pydoc's help topics, in a fixed order."""
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    yield doc
        if path.parts[-2:] == ("pydoc_data", "topics.py"):  # {topic: help text}, a literal dict
            for stmt in tree.body:
                if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Dict):
                    for value in stmt.value.values:
                        if isinstance(value, ast.Constant) and isinstance(value.value, str):
                            yield value.value


def _paragraphs(text: str):
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        indent = len(lines[0]) - len(lines[0].lstrip())
        if any(_CODE_LINE.match(line) or (line.strip() and len(line) - len(line.lstrip()) > indent)
               for line in lines):
            continue
        yield " ".join(line.strip() for line in lines)


def plain(sentence: str) -> bool:
    """Whether `sentence` reads as plain English prose (the rules of the module docstring)."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if _CODE.search(sentence) or '"' in sentence:
        return False
    return sum(bool(_WORD.match(w)) for w in words) >= PLAIN_SHARE * len(words)


def sentences(root: Path | None = None) -> list[str]:
    """The deduplicated, sorted plain-prose sentences of the standard library at `root`
    (default: the running interpreter's)."""
    seen: dict[str, str] = {}
    for text in _texts(root or stdlib_root()):
        for para in _paragraphs(text):
            for s in _BREAK.split(" ".join(para.split())):
                if plain(s):
                    seen.setdefault(s.casefold(), s)
    return sorted(seen.values())


def split(pool: list[str], n_train: int, n_held: int, *, exclude=(), seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint seeded draws from `pool`: `n_train` training and `n_held` held-out sentences, none of
    them (case-insensitive) in `exclude`."""
    banned = {s.casefold() for s in exclude}
    usable = [s for s in pool if s.casefold() not in banned]
    if n_train + n_held > len(usable):
        raise ValueError(f"asked for {n_train} + {n_held} sentences, the pool has {len(usable)}")
    order = np.random.default_rng(seed).permutation(len(usable))
    held = [usable[i] for i in order[:n_held]]
    train = [usable[i] for i in order[n_held:n_held + n_train]]
    return train, held


def tokenize(tokenizer, texts: list[str], seq: int, inputs: tuple[str, ...]) -> dict[str, np.ndarray]:
    """`texts` padded to `seq` tokens (int64 arrays named `inputs`); a sentence that would fill all
    `seq` tokens (and might be cut) is dropped."""
    enc = tokenizer(texts, padding="max_length", max_length=seq, truncation=True, return_tensors="np")
    arrays = {k: np.asarray(enc[k], dtype=np.int64) for k in inputs}
    fits = arrays["attention_mask"].sum(1) < seq
    return {k: v[fits] for k, v in arrays.items()}


def describe(pool: list[str]) -> str:
    return f"{len(pool)} plain-prose sentences of the Python {sys.version.split()[0]} standard library's docstrings"


if __name__ == "__main__":  # a look at the pool: its size and a seeded sample
    got = sentences()
    print(describe(got))
    for s in split(got, 20, 0, seed=1)[0]:
        print("-", s)
