"""What each extraction step asks the model (the prompt and the JSON schema of the
answer) and how an answer is read: parsed and checked, or refused as `BadOutput`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from marie_memory import limits
from marie_memory.core import content_stems
from marie_memory.records import EVENT_ADD, EVENT_DELETE, EVENT_NONE, EVENT_UPDATE


@dataclass(frozen=True, slots=True)
class Bounds:
    """How much one answer may hold: the schema's `maxItems` and `maxLength`, and the
    call's `max_tokens` (room for that much JSON, so a model that loops is cut off
    at the bound, and a grammar-constrained one cannot loop at all)."""

    items: int
    text_length: int
    max_tokens: int


#: The first try, and the stricter retry after an unusable answer.
FIRST = Bounds(items=10, text_length=200, max_tokens=1000)
STRICT = Bounds(items=5, text_length=120, max_tokens=400)
MAX_FACT_CATEGORIES = 3
CATEGORY_LENGTH = 32


def facts_schema(bounds: Bounds) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "facts": {
                "type": "array",
                "maxItems": bounds.items,
                "items": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string", "minLength": 1, "maxLength": bounds.text_length},
                        "categories": {
                            "type": "array",
                            "maxItems": MAX_FACT_CATEGORIES,
                            "items": {"type": "string", "maxLength": CATEGORY_LENGTH},
                        },
                    },
                    "required": ["text", "categories"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["facts"],
        "additionalProperties": False,
    }


def decisions_schema(bounds: Bounds, existing: int, facts: int) -> dict[str, Any]:
    """One decision per fact at most; ids only those shown (or "new" for an ADD)."""
    return {
        "type": "object",
        "properties": {
            "memory": {
                "type": "array",
                "maxItems": max(1, min(facts, bounds.items)),
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "enum": [*map(str, range(existing)), "new"]},
                        "text": {"type": "string", "maxLength": bounds.text_length},
                        "event": {"type": "string", "enum": ["ADD", "UPDATE", "DELETE", "NONE"]},
                    },
                    "required": ["id", "text", "event"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["memory"],
        "additionalProperties": False,
    }


FACTS_SCHEMA = facts_schema(FIRST)
DECISIONS_SCHEMA = decisions_schema(FIRST, 0, FIRST.items)

FACTS_PROMPT = """You extract long-term memories about the user from a conversation.
Return short, self-contained facts about the user (preferences, personal details,
plans, relationships, health, work), each one sentence written in the third person
without a subject, e.g. "Is vegetarian", "Lives in Lisbon", "Has a dog named Rex".
Only facts the conversation states or clearly implies about the user; nothing about
the assistant, no greetings, no questions, no general knowledge. Give each fact zero
to three short lowercase categories such as "preferences", "health", "work".
If there is nothing worth remembering, return an empty list.
Answer with JSON only: {"facts": [{"text": "...", "categories": ["..."]}]}."""

DECISIONS_PROMPT = """You keep a user's long-term memories up to date.
You get the user's existing memories (each with an id) and newly extracted facts.
For each new fact decide:
- ADD: the fact is new; give its text (id: "new");
- UPDATE: the fact refines or changes an existing memory about the same thing;
  give that memory's id and the new combined text;
- DELETE: the fact contradicts an existing memory that is no longer true; give its id;
- NONE: an existing memory already says it; give that memory's id.
Answer with JSON only:
{"memory": [{"id": "...", "text": "...", "event": "ADD|UPDATE|DELETE|NONE"}]}."""


class BadOutput(Exception):
    """The model's answer is not JSON following the schema (or was cut off)."""


@dataclass(frozen=True, slots=True)
class Fact:
    text: str
    categories: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    event: int
    text: str
    #: Index into the existing memories shown to the model; -1 for ADD.
    target: int


def _categories(value: Any) -> tuple[str, ...]:
    """Categories the model chose that fit the limits (others are dropped, not fatal)."""
    if not isinstance(value, list):
        raise BadOutput("categories is not a list")
    kept = []
    for item in value:
        if not isinstance(item, str):
            raise BadOutput("a category is not a string")
        category = item.strip().lower()
        if 1 <= len(category) <= limits.MAX_CATEGORY and category not in kept:
            kept.append(category)
    return tuple(kept[:3])


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def unlooped(text: str) -> str:
    """The text with repeated sentences said once, and a last fragment that only
    starts one of them again dropped: what a small model that loops inside a
    string leaves ("I have two cats. I have two cats. I have two c")."""
    kept: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        start = sentence.lower().rstrip(".… ")
        if kept and any(k.lower().startswith(start) for k in kept):
            continue  # said already, or the start of it again ("I have two...")
        kept.append(sentence)
    return " ".join(kept)


def grounded(fact: str, conversation: str) -> bool:
    """Whether a fact shares a word (by its first letters) with the conversation it
    was extracted from: a fact that shares none is the model's invention (a small
    model answers "Paris" to "What is the capital of France?")."""
    words = content_stems(fact)
    return not words or bool(words & content_stems(conversation))


def parse_facts(content: str, conversation: str = "") -> list[Fact]:
    try:
        value = json.loads(content)
    except ValueError as exc:
        raise BadOutput("not JSON") from exc
    if not isinstance(value, dict) or not isinstance(value.get("facts"), list):
        raise BadOutput('no "facts" list')
    facts: list[Fact] = []
    seen: set[str] = set()
    for item in value["facts"]:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise BadOutput("a fact has no text")
        text = unlooped(item["text"])
        if not text or text.lower() in seen:
            continue  # a small model repeats itself: once is enough
        if conversation and not grounded(text, conversation):
            continue
        if len(text) > limits.MAX_MEMORY_TEXT:
            raise BadOutput("a fact is too long")
        seen.add(text.lower())
        facts.append(Fact(text, _categories(item.get("categories", []))))
    return facts


def parse_decisions(content: str, existing: int) -> list[Decision]:
    try:
        value = json.loads(content)
    except ValueError as exc:
        raise BadOutput("not JSON") from exc
    if not isinstance(value, dict) or not isinstance(value.get("memory"), list):
        raise BadOutput('no "memory" list')
    events = {"ADD": EVENT_ADD, "UPDATE": EVENT_UPDATE, "DELETE": EVENT_DELETE, "NONE": EVENT_NONE}
    decisions = []
    for item in value["memory"]:
        if not isinstance(item, dict):
            raise BadOutput("a decision is not an object")
        event = events.get(item.get("event"))  # type: ignore[arg-type]
        text = item.get("text", "")
        raw_id = item.get("id", "")
        if event is None or not isinstance(text, str) or not isinstance(raw_id, str | int):
            raise BadOutput("a decision does not follow the schema")
        text = text.strip()
        if raw_id == "new" and event in (EVENT_NONE, EVENT_DELETE):
            continue  # nothing to keep, nothing to remove
        if event == EVENT_ADD or raw_id == "new":  # an UPDATE of nothing adds
            if not text or len(text) > limits.MAX_MEMORY_TEXT:
                raise BadOutput("an ADD without a usable text")
            decisions.append(Decision(EVENT_ADD, text, -1))
            continue
        try:
            target = int(raw_id)
        except ValueError as exc:
            raise BadOutput(f"unknown memory id {raw_id!r}") from exc
        if not 0 <= target < existing:
            raise BadOutput(f"unknown memory id {raw_id!r}")
        if event == EVENT_UPDATE and (not text or len(text) > limits.MAX_MEMORY_TEXT):
            raise BadOutput("an UPDATE without a usable text")
        decisions.append(Decision(event, text, target))
    return decisions
