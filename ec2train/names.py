"""Names that come from folders and model files, checked once and shown safely everywhere.

A class name is a folder name (or whatever a model file carries): it may hold a newline, a
terminal escape sequence, a bidirectional override, bytes that are not UTF-8 (Python keeps them
as lone surrogates) or thousands of characters. `name_problem` is the check a data set's class
folders must pass (`data check`, `fit`'s start). `printable` is how such text is shown, in the
confusion picture, TensorBoard, a terminal, a CSV file or an error line: every control, surrogate,
line-separator and bidi character becomes a visible escape (`\\n`, `\\x1b`, `\\u202e`), so the
text stays one line, draws without crashing Pillow's layout engine and cannot move a terminal's
cursor. JSON needs neither: its encoder escapes them itself. `csv_cell` adds the guard against
formula injection. Import-free, so the serving package may carry it.
"""

from __future__ import annotations

import unicodedata

MAX_NAME_CHARS = 128  # dogImages' longest breed has 34; a file system allows 255 bytes
ELLIPSIS = "\u2026"
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Bidirectional embeddings, overrides, isolates and marks: they reorder the text around them.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})  # controls, surrogates, line/paragraph separators
# A spreadsheet runs a cell that starts with one of these as a formula (OWASP "CSV injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _unsafe(ch: str) -> bool:
    return ch in _BIDI or unicodedata.category(ch) in _UNSAFE_CATEGORIES


def _escape(ch: str) -> str:
    code = ord(ch)
    return _NAMED.get(ch) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(value: object, limit: int | None = None) -> str:
    """`value` as one line that is safe to draw, print or log; cut to `limit` characters
    (ending in an ellipsis) when given. Not a string (a crafted model file's label): its str()."""
    text = value if isinstance(value, str) else str(value)
    if not text.isprintable():  # the fast path: isprintable() is False for every character escaped here
        text = "".join(_escape(ch) if _unsafe(ch) else ch for ch in text)
    if limit is not None and len(text) > limit:
        text = text[: max(0, limit - 1)] + ELLIPSIS
    return text


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a class name (a phrase: "holds a newline (\\n)"), or None."""
    bad = next((ch for ch in name if _unsafe(ch)), None)
    if bad is not None:
        if unicodedata.category(bad) == "Cs":
            return "is not valid UTF-8"
        what = {"\x1b": "an escape character", "\n": "a newline", "\r": "a carriage return", "\t": "a tab"}
        kind = "a bidirectional control" if bad in _BIDI else "a control character"
        return f"holds {what.get(bad, kind)} ({_escape(bad)})"
    if not name.strip():
        return "is empty"
    if len(name) > MAX_NAME_CHARS:
        return f"is {len(name)} characters long (at most {MAX_NAME_CHARS})"
    return None


def csv_cell(value: object) -> str:
    """`printable(value)` for a CSV cell, with a leading ' when a spreadsheet would take it for
    a formula (=, +, -, @, tab, carriage return)."""
    text = printable(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text
