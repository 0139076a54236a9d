"""Small wording helpers for messages (torch-free): counts with the right noun form."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``"1 epoch"``, ``"2 epochs"``; `nouns` for an irregular plural."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
