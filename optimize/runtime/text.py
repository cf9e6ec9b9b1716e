"""Text for messages: the one helper every layer needs, so it sits at the bottom."""

from __future__ import annotations


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to about ``limit`` characters for a message, saying how long it was.

    >>> shorten("a red fox " * 20, 20)
    'a red fox a red fox ... (200 characters)'
    """
    head = " ".join(text[:limit + 1].split())  # line breaks and runs of spaces as one space
    return head if len(text) <= limit else f"{head[:limit].rstrip()} ... ({len(text)} characters)"
