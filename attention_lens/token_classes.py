"""Simple rules that sort token texts into classes (numbers, punctuation, dates, names, ...) and describe a mix."""

from __future__ import annotations

import unicodedata

CLASSES = ("whitespace", "number", "date", "punctuation", "function word", "capitalized", "word", "fragment",
           "byte", "other")
MONTHS = {"january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov",
          "dec", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"}
FUNCTION_WORDS = set(
    "a an the and or but nor so yet if then than that this these those there here of in on at by for with from "
    "to into onto upon about above below over under between among through during before after since until "
    "as is are was were be been being am do does did have has had will would shall should can could may might "
    "must not no i you he she it we they me him her us them my your his its our their mine yours who whom "
    "whose which what when where why how all any each every some such only also very just too".split()
)
DOMINANT_TOKEN = 0.5
"""A head whose top promoted token holds this share is described by that token."""
DOMINANT_CLASS = 0.6
"""A head whose top class holds this share is described by that class."""
PLURAL = {"number": "numbers", "date": "dates", "function word": "function words", "capitalized": "capitalized words",
          "word": "lowercase words", "fragment": "subword fragments", "byte": "partial characters"}


def token_class(text: str) -> str:
    """One class of CLASSES for a token's text; a leading space marks a word start (byte-level BPE)."""
    stripped = text.strip()
    if not stripped:
        return "whitespace"
    if "\ufffd" in stripped:
        return "byte"  # part of a multi-byte character: decodes to the replacement character on its own
    starts_word = text[0].isspace()
    if stripped.isdigit() and len(stripped) == 4 and 1000 <= int(stripped) <= 2199:
        return "date"  # a year
    if stripped.lower() in MONTHS and (starts_word or stripped[0].isupper()):
        return "date"
    if stripped.replace(",", "").replace(".", "").isdigit():
        return "number"
    if all(unicodedata.category(c)[0] in "PS" for c in stripped):
        return "punctuation"
    if stripped.isalpha():
        if stripped.lower() in FUNCTION_WORDS and (starts_word or stripped[0].isupper()):
            return "function word"
        if stripped[0].isupper():
            return "capitalized"
        return "word" if starts_word else "fragment"
    return "other"


def describe(class_shares: dict[str, float], top_token: str, top_share: float) -> str:
    """A short description of what a head promotes, or 'mixed (...)' when no rule fits clearly."""
    if top_share >= DOMINANT_TOKEN:
        return f"mostly {top_token!r} ({top_share:.0%})"
    ranked = sorted(class_shares.items(), key=lambda item: -item[1])
    if not ranked:
        return "nothing"
    name, share = ranked[0]
    if share >= DOMINANT_CLASS:
        return f"{PLURAL.get(name, name)} ({share:.0%})"
    return "mixed (" + ", ".join(f"{PLURAL.get(n, n)} {s:.0%}" for n, s in ranked[:2]) + ")"
