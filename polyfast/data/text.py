"""Text measures of docs/method.md section 1: normalisation, token counts, length bins, language,
bucket ids and the profile system prompt. Pure functions of strings; no tokenizer involved."""

from __future__ import annotations

import re

# An English word (with one inner apostrophe), a digit run, one Han character, one punctuation char.
_CURRENT = re.compile(
    r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\w\s]")
# The regex the authors' released English data was binned with.
_LEGACY = re.compile(r"\w+|[^\w\s]")
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_SPACES = re.compile(r"[ \t\f\v]+")
_BLANK_RUNS = re.compile(r"\n{3,}")

LANGUAGES = ("en", "zh")
TRACKS = ("single", "multi")
FAMILIES = ("assistant", "qa", "dialogue")
LENGTH_BINS = ("short", "medium", "long", "xlong")
# Upper token bounds of each bin but the last (inclusive).
BIN_EDGES = (40, 120, 240)

PROFILE_PREFIX = "You are a helpful assistant. Follow the target response profile when answering."
PLAIN_SYSTEM = "You are a helpful assistant."


def normalize_whitespace(text: str) -> str:
    """CRLF/CR -> LF, collapse spaces inside lines, collapse runs of blank lines, strip."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def token_count(text: str, legacy: bool = False) -> int:
    """Tokens of a human response as docs/method.md counts them (current regex, or the authors' legacy one)."""
    pattern = _LEGACY if legacy else _CURRENT
    return sum(1 for _ in pattern.finditer(normalize_whitespace(text)))


def length_bin(n_tokens: int) -> str:
    """"short" (<= 40) | "medium" (<= 120) | "long" (<= 240) | "xlong"."""
    for edge, name in zip(BIN_EDGES, LENGTH_BINS):
        if n_tokens <= edge:
            return name
    return LENGTH_BINS[-1]


def detect_language(text: str) -> str:
    """"zh" when Han characters outnumber Latin letters, else "en"."""
    han = len(HAN.findall(text))
    return "zh" if han > 0 and han >= len(_LATIN.findall(text)) else "en"


def bucket_id(language: str, track: str, family: str, length_bin: str) -> str:
    """The 4-part bucket key (style is deliberately not part of it)."""
    return f"{language}|{track}|{family}|{length_bin}"


def profile_prompt(family: str = "", track: str = "", style: str = "", length_bin: str = "") -> str:
    """The paper's profile system prompt; empty parts are dropped, all empty gives the plain prompt."""
    parts = [f"{k}={v}" for k, v in
             (("family", family), ("track", track), ("style", style), ("length", length_bin)) if v]
    if not parts:
        return PLAIN_SYSTEM
    return f"{PROFILE_PREFIX} {'; '.join(parts)}."


def is_profile_prompt(system: str) -> bool:
    return system.startswith(PROFILE_PREFIX) or system.strip() == PLAIN_SYSTEM
