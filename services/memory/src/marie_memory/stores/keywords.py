"""The words of a free-text keyword query, as both stores read it: word characters
only (no query syntax reaches a store), common English words dropped."""

from __future__ import annotations

import re

WORD = re.compile(r"\w+", re.UNICODE)

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


def query_words(text: str) -> list[str]:
    """The words of `text`, stop words dropped unless nothing else is left."""
    words = WORD.findall(text)
    return [w for w in words if w.lower() not in STOPWORDS] or words
