"""Token families: the detectors that label each token of a text by what it is (a script, code punctuation, a
URL, a citation, ...), from its bytes and its neighbours' (the package's docstring says how they are used)."""


from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ..tokenizer import EOT_ID, N_VOCAB  # GPT-2's; the chapters and the causal stage read them here too

# --- detectors --------------------------------------------------------------------------------------

# Unicode blocks of the scripts in our corpus (non-English sources: Arabic Quran, Chinese poetry, UDHR and
# localised manuals in many languages)
_SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "arabic": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "hebrew": ((0x0590, 0x05FF),),
    "cyrillic": ((0x0400, 0x052F),),
    "greek": ((0x0370, 0x03FF), (0x1F00, 0x1FFF)),
    "cjk": ((0x3000, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
            (0xFF00, 0xFFEF)),
    "indic": ((0x0900, 0x0DFF),),
    "latin-diacritic": ((0x00C0, 0x00D6), (0x00D8, 0x00F6), (0x00F8, 0x024F)),  # é ü å ø ß ...
}
_CHAR_SETS: dict[str, str] = {
    "code-brace": "{}",
    "code-syntax": "();=<>[]*&|^%#~`",
    "digits": "0123456789",
}
_REGEXES: dict[str, re.Pattern[str]] = {
    "url": re.compile(r"(?:https?|ftp)://[^\s<>\"')\]]+|www\.[^\s<>\"')\]]+"),
    "citation": re.compile(r"\[@[^\]\s]*\]?|\\cite[a-zA-Z]*\{[^}]*\}|\[\d+(?:\s*[,–-]\s*\d+)*\]|\bet al\b\.?"),
    "latex": re.compile(r"\\[A-Za-z]+|\$"),
}
_PUNCTUATION = set(".,;:!?'\"-–—…()«»“”‘’")
FAMILIES: dict[str, str] = {
    **{name: f"a character of the {name} script" if name != "latin-diacritic" else
       "a Latin letter with a diacritic (é, ü, å, ø, ...)" for name in _SCRIPTS},
    "code-brace": "a curly brace, { or }",
    "code-syntax": "code punctuation: ( ) ; = < > [ ] * & | ^ % # ~ `",
    "digits": "a digit",
    "url": "part of a URL",
    "citation": "part of a citation marker: [@key], \\cite{...}, [12], et al.",
    "latex": "a LaTeX command (\\word) or a dollar sign",
    "punctuation": "only prose punctuation (. , ; : ! ? quotes dashes brackets)",
    "capitalised": "a capitalised word (Xxxx)",
    "whitespace": "only whitespace (newlines, indentation)",
}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)
_CAPITALISED = re.compile(r"^[A-Z][a-z]+$")


def _char_owners(pieces: Sequence[bytes]) -> tuple[str, np.ndarray, np.ndarray]:
    """The text of the concatenated token bytes (invalid UTF-8 -> U+FFFD) and, per character, the first
    and last token holding its bytes (a character split across byte-level tokens belongs to each)."""
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    ends = np.cumsum(lengths)  # byte end (exclusive) of each token
    data = b"".join(pieces)
    if data.isascii():
        idx = np.arange(len(data))
        owner = np.searchsorted(ends, idx, side="right")
        return data.decode("ascii"), owner, owner
    chars, starts, sizes = [], [], []
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        size = 1 if b < 0x80 else 2 if 0xC0 <= b < 0xE0 else 3 if 0xE0 <= b < 0xF0 else 4 if 0xF0 <= b < 0xF8 else 1
        try:
            ch = data[i:i + size].decode("utf-8")
        except UnicodeDecodeError:
            ch, size = "\ufffd", 1
        chars.append(ch)
        starts.append(i)
        sizes.append(size)
        i += size
    s, z = np.asarray(starts, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
    return "".join(chars), np.searchsorted(ends, s, side="right"), np.searchsorted(ends, s + z - 1, side="right")


def token_families(pieces: Sequence[bytes], eot: Sequence[bool] | None = None) -> np.ndarray:
    """(T, len(FAMILY_NAMES)) bool: which families each token of one contiguous text belongs to.

    ``pieces``: each token's bytes, in order; ``eot``: tokens that are document separators (no family).
    Character families (scripts, braces, digits) mark every token holding part of such a character;
    pattern families (URLs, citations, LaTeX) every token overlapping a match in the decoded text; token
    families (punctuation, capitalised, whitespace) look at the token alone."""
    T = len(pieces)
    out = np.zeros((T, len(FAMILY_NAMES)), dtype=bool)
    if T == 0:
        return out
    col = {name: j for j, name in enumerate(FAMILY_NAMES)}
    text, first, last = _char_owners(pieces)
    if text:
        cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point per character
        char_masks = []
        for name, ranges in _SCRIPTS.items():
            m = np.zeros(len(cp), dtype=bool)
            for lo, hi in ranges:
                m |= (cp >= lo) & (cp <= hi)
            char_masks.append((col[name], m))
        for name, chars in _CHAR_SETS.items():
            char_masks.append((col[name], np.isin(cp, np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32))))
        spanning = np.flatnonzero(first != last)
        for j, m in char_masks:
            out[first[m], j] = True
            for c in spanning[m[spanning]]:
                out[first[c]:last[c] + 1, j] = True
        for name, pattern in _REGEXES.items():
            for match in pattern.finditer(text):
                a, b = match.span()
                if b > a:
                    out[first[a]:last[b - 1] + 1, col[name]] = True
    for t, piece in enumerate(pieces):
        s = piece.decode("utf-8", errors="replace")
        stripped = s.strip()
        if not stripped:
            out[t, col["whitespace"]] = bool(s)
        elif all(c in _PUNCTUATION for c in stripped):
            out[t, col["punctuation"]] = True
        elif _CAPITALISED.match(stripped):
            out[t, col["capitalised"]] = True
    if eot is not None:
        out[np.asarray(eot, dtype=bool)] = False
    return out


def partial_character_families(piece: bytes) -> list[str]:
    """The script families of the character a token's bytes begin but do not finish. A UTF-8 lead byte at the
    token's end, with the continuation bytes after it, fixes a range of code points (a lead byte 0xD8 alone:
    U+0600 to U+063F); a script family is named when its blocks hold that whole range, and none when the range
    straddles blocks (0xE4 alone may be CJK or not). Continuation bytes at a token's start end a character
    begun in an earlier token and say nothing alone."""
    lead = next((i for i in range(len(piece) - 1, -1, -1) if piece[i] >= 0xC0), None)
    if lead is None:
        return []
    b = piece[lead]
    size = 2 if b < 0xE0 else 3 if b < 0xF0 else 4 if b < 0xF8 else 0
    tail = piece[lead + 1:]
    if not size or len(tail) >= size - 1 or any(not 0x80 <= c < 0xC0 for c in tail):
        return []  # not a lead byte, a whole character, or not UTF-8
    prefix = b & (0x7F >> size)
    for c in tail:
        prefix = (prefix << 6) | (c & 0x3F)
    missing = 6 * (size - 1 - len(tail))
    lo, hi = prefix << missing, ((prefix + 1) << missing) - 1
    out = []
    for name, ranges in _SCRIPTS.items():
        covered, point = True, lo
        while point <= hi and covered:  # walk the range through the family's blocks
            block = next(((r_lo, r_hi) for r_lo, r_hi in ranges if r_lo <= point <= r_hi), None)
            covered = block is not None
            point = block[1] + 1 if block else point
        if covered:
            out.append(name)
    return out


def window_families(tokenizer, windows: np.ndarray) -> np.ndarray:
    """(W, T, F) bool family labels of token windows (W, T), each window read as one text. ``tokenizer``:
    GPT-2's (:mod:`monosemantic.tokenizer`) or any with ``token_bytes``, ``eot_id`` and ``n_vocab``."""
    eot, n_vocab = getattr(tokenizer, "eot_id", EOT_ID), getattr(tokenizer, "n_vocab", N_VOCAB)
    out = np.zeros((*windows.shape, len(FAMILY_NAMES)), dtype=bool)
    cache: dict[int, bytes] = {}
    for w, ids in enumerate(windows):
        missing = sorted({i for i in ids.tolist() if i not in cache})
        real = [i for i in missing if i != eot and i < n_vocab]
        cache.update(dict.fromkeys(missing, b""))
        cache.update(zip(real, tokenizer.token_bytes(real), strict=True))
        out[w] = token_families([cache[i] for i in ids.tolist()], ids == eot)
    return out


def vocab_family_masks(token_bytes: list[bytes], byte_aware: bool = True) -> np.ndarray:
    """(V, n_families) bool: the families each vocabulary token belongs to when read alone; ``byte_aware``:
    also the script of a character the token begins but does not finish, where its bytes fix the script
    (:func:`partial_character_families`: a lone Arabic lead byte is Arabic)."""
    if not token_bytes:
        return np.zeros((0, 0), bool)
    out = np.concatenate([token_families([b]) for b in token_bytes])
    if byte_aware:
        col = {name: j for j, name in enumerate(FAMILY_NAMES)}
        for t, b in enumerate(token_bytes):
            for name in partial_character_families(b):
                out[t, col[name]] = True
    return out
