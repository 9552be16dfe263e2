"""Combined queries: weighted images, words and db items summed into one query vector, and the filters on its hits.

    parse_terms('"2:golden retriever" + ./pool.jpg - fruit', is_image=os.path.isfile)
    -> (Term("text", "golden retriever", 2.0), Term("image", "./pool.jpg"), Term("text", "fruit", -1.0))

The syntax is rclip's: terms joined by " + " or " - " (spaces on both sides, so "t-shirt" stays one word), each
term optionally prefixed by a weight "W:" (a plain number), quotes around a term keep a " + " inside it. A literal
text that starts with a number and a colon ("3:10 to yuma") takes an explicit weight first: "1:3:10 to yuma".
Which terms are image files is the caller's call (`is_image`): the CLI asks the file system, a server must not.
Searcher.search (search.py) embeds the terms and applies the filters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from simsearch.errors import SimsearchError
from simsearch.indexer.scan import item_path

TermKind = Literal["image", "text", "item"]


@dataclass(frozen=True)
class Term:
    kind: TermKind  # an image file | words (the encoder's text tower) | an item of the db (its stored vector)
    value: str | int  # image: its path; text: the words; item: its id in the db
    weight: float = 1.0  # negative subtracts


@dataclass(frozen=True)
class Query:
    terms: tuple[Term, ...]
    min_score: float | None = None  # drop hits whose cosine to the combined query vector is below it
    under: str | None = None  # only items under this folder, or whose path matches this glob (see PathFilter)


_SEP = re.compile(r"\s*(?<!\S)([+-])(?!\S)\s*")  # a lone "+" or "-" between terms: "t-shirt" is one word
_QUOTED = re.compile(r'("[^"]*")')  # a quoted piece: its separators are words (an apostrophe quotes nothing)
_WEIGHT = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+)):(.*)$", re.S)


def parse_terms(text: str, is_image: Callable[[str], bool] | None = None) -> tuple[Term, ...]:
    """The terms of an rclip-style query (module docstring); `is_image(value)` says which are image files (default:
    none: every term is words). SimsearchError for an empty term or an unmatched quote."""
    if text.count('"') % 2:
        raise SimsearchError(f"unmatched quote in the query {text!r}")
    terms: list[tuple[float, str]] = []  # (sign, the term's text)
    sign, current = 1.0, ""
    for i, piece in enumerate(_QUOTED.split(text.strip())):
        if i % 2:  # quoted: part of the current term as it is
            current += piece[1:-1]
            continue
        parts = _SEP.split(piece)  # [text, sign, text, sign, ..., text]
        for j, part in enumerate(parts):
            if not j % 2:
                current += part
                continue
            if current.strip():
                terms.append((sign, current))
            elif terms or j > 1 or i:  # "a + + b": a sign after nothing (only the query's first may lead)
                raise SimsearchError(f"an empty term in the query {text!r}")
            sign, current = (1.0 if part == "+" else -1.0), ""
    if not current.strip():
        raise SimsearchError(f"an empty term in the query {text!r}" if terms else "an empty query")
    terms.append((sign, current))
    return tuple(_term(value.strip(), sign, is_image) for sign, value in terms)


def _term(text: str, sign: float, is_image: Callable[[str], bool] | None) -> Term:
    weight = 1.0
    if (m := _WEIGHT.match(text)) and not (is_image and is_image(text)):  # a file named "2:x.jpg" is that file
        weight, text = float(m.group(1)), m.group(2).strip()
    if not text:
        raise SimsearchError("a weight with no term after it")
    return Term("image" if is_image and is_image(text) else "text", text, sign * weight)


def describe(terms: tuple[Term, ...]) -> str:
    """The terms as one line of the query syntax (parse_terms reads back its image and text terms; an item is
    written `item:ID`, which only a caller that knows items reads)."""
    out = []
    for t in terms:
        value = f"item:{t.value}" if t.kind == "item" else str(t.value)
        w = abs(t.weight)
        term = f"{w:g}:{value}" if w != 1 or _WEIGHT.match(value) else value  # "1:3:10 to yuma" keeps its "3:"
        if _SEP.search(value) and '"' not in value:  # a value with a '"' in it cannot be quoted
            term = f'"{term}"'
        sign = "-" if t.weight < 0 else "+"
        out.append(f"{sign} {term}" if out or sign == "-" else term)
    return " ".join(out)


_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class PathFilter:
    """`under` resolved against the stored item paths (absolute, folders' symlinks resolved: indexer/scan.item_path).

    folder: every match lies in it (the store's prefix range scan: Store.iter_items(under=folder));
    pattern: None for a folder, else a glob over the whole path: `*` and `?` stay within one folder level,
    `**/` spans any number of folders (none included), `[...]` is a character class.
    """

    folder: str
    pattern: re.Pattern | None = None

    @classmethod
    def of(cls, under: str) -> PathFilter:
        """A folder (or file) when it exists or has no glob characters, else a glob. A relative one is taken from
        the current folder, as `simsearch index` takes its folder."""
        if not _GLOB.search(under) or os.path.exists(under):  # a folder's symlinks resolved; a file keeps its name
            return cls(os.path.realpath(under) if os.path.isdir(under) else item_path(under))
        head, rest = [], os.path.abspath(under).split(os.sep)
        while rest and not _GLOB.search(rest[0]):  # the folders before the first glob: resolved as the store's are
            head.append(rest.pop(0))
        folder = os.path.realpath(os.sep.join(head) or os.sep)
        return cls(folder, re.compile(_glob_regex(os.path.join(folder, *rest)), re.S))

    def __call__(self, path: str) -> bool:
        if self.pattern is not None:
            return self.pattern.fullmatch(path) is not None
        return path == self.folder or path.startswith(self.folder.rstrip(os.sep) + os.sep)


def _glob_regex(pattern: str) -> str:
    sep = re.escape(os.sep)
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**" + os.sep, i):
            out.append(f"(?:.*{sep})?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append(f"[^{sep}]*")
            i += 1
        elif c == "?":
            out.append(f"[^{sep}]")
            i += 1
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:  # "[]...]": a leading "]" is a member
            body = pattern[i + 1:end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)
