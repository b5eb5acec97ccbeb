"""What the fake Ollama answers to a chat request with a JSON schema in `format`.

A real model with structured output answers JSON that follows the schema; so
does the fake, deterministically:

- Marie memory's two extraction steps are recognised by their schemas
  ("facts" and "memory" properties) and answered the way a careful model
  would: every sentence the user says (not questions) becomes a fact; then
  each fact is compared with the existing memories it was shown: same text →
  NONE, "no longer …"/"not …" facts → DELETE of the memory they share the most
  words with, half or more words in common → UPDATE of that memory, else ADD;
- any other schema gets a minimal instance (first enum value, "" for strings,
  0 for numbers, false, [] and objects with their required properties).
"""

from __future__ import annotations

import json
import re
from typing import Any

JSONObject = dict[str, Any]

_WORD = re.compile(r"\w+")
_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "i",
        "am",
        "is",
        "are",
        "my",
        "me",
        "to",
        "of",
        "and",
        "in",
        "on",
        "at",
        "for",
        "with",
        "like",
        "likes",
        "do",
        "does",
        "not",
        "no",
        "longer",
        "anymore",
    ]
)


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def _user_lines(messages: list[JSONObject]) -> list[str]:
    """The conversation's user lines, from the prompt the extractor sent."""
    lines: list[str] = []
    for message in messages:
        if message.get("role") != "user":
            continue
        for line in str(message.get("content", "")).splitlines():
            if line.startswith("user: "):
                lines.append(line[len("user: ") :])
    return lines


def _facts(messages: list[JSONObject]) -> JSONObject:
    facts = []
    for line in _user_lines(messages):
        for raw in re.split(r"(?<=[.!?])\s+", line):
            sentence = raw.strip()
            if not sentence or sentence.endswith("?"):
                continue
            text = sentence.rstrip(".!")
            text = re.sub(r"^I am ", "Is ", text)
            text = re.sub(r"^I'm ", "Is ", text)
            text = re.sub(r"^I ", "", text)
            text = text[:1].upper() + text[1:]
            facts.append({"text": text, "categories": ["personal"]})
    return {"facts": facts}


def _decisions(messages: list[JSONObject]) -> JSONObject:
    payload: JSONObject = {}
    for message in messages:
        if message.get("role") == "user":
            try:
                payload = json.loads(str(message.get("content", "")))
            except ValueError:
                continue
    existing = payload.get("existing_memories", [])
    decisions = []
    for fact in payload.get("new_facts", []):
        words = _words(fact)
        same = next((m for m in existing if m["text"].lower() == fact.lower()), None)
        if same is not None:
            decisions.append({"id": same["id"], "text": same["text"], "event": "NONE"})
            continue
        best, overlap = None, 0
        for memory in existing:
            shared = len(words & _words(memory["text"]))
            if shared > overlap:
                best, overlap = memory, shared
        negative = re.search(r"\b(no longer|not|anymore)\b", fact.lower()) is not None
        if best is not None and negative:
            decisions.append({"id": best["id"], "text": best["text"], "event": "DELETE"})
        elif best is not None and overlap * 2 >= max(len(words), 1):
            decisions.append({"id": best["id"], "text": fact, "event": "UPDATE"})
        else:
            decisions.append({"id": "new", "text": fact, "event": "ADD"})
    return {"memory": decisions}


def minimal_instance(schema: Any) -> Any:
    """The smallest value that follows a JSON schema (the subset models are given)."""
    if not isinstance(schema, dict):
        return None
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties", {})
        required = schema.get("required", list(properties))
        return {name: minimal_instance(properties.get(name, {})) for name in required}
    defaults = {"array": [], "string": "", "integer": 0, "number": 0, "boolean": False}
    return defaults.get(str(kind))


def structured_answer(schema: Any, messages: list[JSONObject]) -> Any:
    """The JSON value the fake answers for `schema` and the request's messages."""
    properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
    if "facts" in properties:
        return _facts(messages)
    if "memory" in properties:
        return _decisions(messages)
    return minimal_instance(schema)
