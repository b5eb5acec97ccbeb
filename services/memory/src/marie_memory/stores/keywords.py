"""The words of a free-text keyword query, as both stores read it: word characters
only (no query syntax reaches a store), common English words dropped; and how
both stores fold text for keyword search, stored texts and queries alike.

Folding is Unicode compatibility normalisation (NFKC) then full case folding:
"Zürich" written with a combining diaeresis (NFD) is the composed one, "Zurich"
in full-width letters (U+FF3A…) is "zurich", the ligature U+FB01 is "fi",
"Straße" is "strasse". (Each store also drops diacritics, as it did before:
"zurich" finds "Zürich".)"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Sequence

WORD = re.compile(r"\w+", re.UNICODE)
# Characters of context on each side of a highlighted term in a snippet.
SNIPPET_CONTEXT = 80
MAX_SNIPPETS = 3
# Where a highlighted word starts and ends in a marked text (private use).
MARK_OPEN = "\ue000"
MARK_CLOSE = "\ue001"

# Words that match nearly every text: dropped from keyword queries (unless the
# query holds nothing else), which keeps BM25 fast and its ranking meaningful.
STOPWORDS = frozenset(
    (
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "do",
        "does",
        "did",
        "for",
        "from",
        "has",
        "have",
        "had",
        "he",
        "her",
        "his",
        "how",
        "i",
        "if",
        "in",
        "is",
        "it",
        "its",
        "me",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "she",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    )
)


def fold(text: str) -> str:
    """`text` as keyword search compares it (NFKC, then case-folded)."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKC", text).casefold()


def _word_char(c: str) -> bool:
    # What SQLite's unicode61 tokenizer keeps inside a word (letters, digits,
    # private use) and the marks that remove_diacritics strips from it.
    category = unicodedata.category(c)
    return category[0] in "LNM" or category == "Co"


# Code point -> its fold, for the characters whose fold differs (filled as met).
_FOLDED: dict[int, str] = {}
_SEEN: set[str] = set()


def fold_in_place(text: str) -> str:
    """`text` folded character by character, without adding or removing a word
    boundary anywhere: what a store indexes when it highlights the original
    text by word positions (SQLite's FTS5). Separators stay as they are; a
    word character becomes its fold, less any separator the fold brings
    ("½" is "12", not "1", fraction slash, "2"). Compositions across characters need none: a
    decomposed mark is a diacritic that the tokenizer strips anyway."""
    if text.isascii():
        return text
    for c in set(text).difference(_SEEN):
        _SEEN.add(c)
        if not _word_char(c):
            continue
        folded = "".join(x for x in unicodedata.normalize("NFKC", c).casefold() if _word_char(x))
        if folded and folded != c:
            _FOLDED[ord(c)] = folded
    return text.translate(_FOLDED)


def _bare(text: str) -> str:
    """`text` folded, without diacritics (as SQLite's tokenizer drops them)."""
    decomposed = unicodedata.normalize("NFD", fold(text))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def search_form(text: str) -> str:
    """What the OpenSearch store indexes beside a text (its `*_folded` fields)
    and matches a query's words against: folded, without diacritics."""
    return text.lower() if text.isascii() else _bare(text)


# Character -> its search form (filled as met).
_FORMS: dict[str, str] = {}


def mark_words(text: str, words: Sequence[str]) -> str:
    """`text` with MARK_OPEN/MARK_CLOSE around every whole word whose search
    form is one of `words` (search forms): highlights of the stored text for
    a store whose own highlighter cannot see folded matches."""
    folded: list[str] = []
    origin: list[int] = []
    for i, c in enumerate(text):
        form = _FORMS.get(c)
        if form is None:
            form = _FORMS[c] = search_form(c)
        folded.append(form)
        origin.extend([i] * len(form))
    flat = "".join(folded)
    spans: list[tuple[int, int]] = []
    for word in set(words):
        for found in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", flat):
            start, end = origin[found.start()], origin[found.end() - 1] + 1
            # A decomposed mark after the word's last letter belongs to it.
            while end < len(text) and unicodedata.combining(text[end]):
                end += 1
            spans.append((start, end))
    out: list[str] = []
    cursor = 0
    for start, end in sorted(spans):
        if start < cursor:
            continue
        out += [text[cursor:start], MARK_OPEN, text[start:end], MARK_CLOSE]
        cursor = end
    out.append(text[cursor:])
    return "".join(out)


def query_words(text: str) -> list[str]:
    """The words of `text`, folded, stop words dropped unless nothing else is left."""
    words = WORD.findall(fold(text))
    return [w for w in words if w not in STOPWORDS] or words


def highlight_fragments(marked: str) -> list[str]:
    """Up to 3 fragments around the marked terms of `marked` (sentinel marks),
    best (most marks) first, HTML-escaped, with `<mark>` tags."""
    spans: list[tuple[int, int]] = []
    plain: list[str] = []
    position = 0
    start = -1
    for char in marked:
        if char == MARK_OPEN:
            start = position
        elif char == MARK_CLOSE:
            spans.append((start, position))
        else:
            plain.append(char)
            position += 1
    text = "".join(plain)
    if not spans:
        return [html.escape(text[: 2 * SNIPPET_CONTEXT])]
    # Group marks into windows of about 2 x SNIPPET_CONTEXT characters.
    windows: list[list[tuple[int, int]]] = []
    for span in spans:
        if windows and span[1] - windows[-1][0][0] <= 2 * SNIPPET_CONTEXT:
            windows[-1].append(span)
        else:
            windows.append([span])
    ranked = sorted(windows, key=lambda w: -len(w))[:MAX_SNIPPETS]
    fragments = []
    for window in ranked:
        first, last = window[0][0], window[-1][1]
        room = max(0, 2 * SNIPPET_CONTEXT - (last - first)) // 2
        begin, end = max(0, first - room), min(len(text), last + room)
        out = ["…" if begin > 0 else ""]
        cursor = begin
        for span_start, span_end in window:
            out.append(html.escape(text[cursor:span_start]))
            out.append("<mark>" + html.escape(text[span_start:span_end]) + "</mark>")
            cursor = span_end
        out.append(html.escape(text[cursor:end]))
        out.append("…" if end < len(text) else "")
        fragments.append("".join(out))
    return fragments
