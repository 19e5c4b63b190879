"""Tokens as a reader should see them: decoded text with a visible leading space.

Tokenizers store tokens in an internal spelling. Byte-level BPE (GPT-2, SmolLM2, Llama 3, Qwen)
maps every byte to a printable stand-in, so ``" Köln"`` is stored as ``['ĠK', 'Ã¶', 'ln']`` and the
emoji 🗼 as ``['ðŁ', 'Ĺ¼']``; SentencePiece marks a leading space with ``▁`` and spells unknown
bytes as ``<0xE2>``. Printed as they are, these are unreadable, and a leading space (which decides
*which* token an answer is) is invisible once decoded. Every place that shows a token — the result
tables, PNG tick labels, the HTML report, error messages — goes through this module, so a token reads
the same everywhere:

* bytes are decoded as UTF-8: ``'Ã¶'`` → ``ö``;
* a space is shown as ``␣`` (so ``" Paris"`` and ``"Paris"`` differ visibly), a newline as ``\\n``,
  a tab as ``\\t``, other control characters as ``\\xNN``;
* a token that holds only part of a character's bytes (an emoji split over two tokens) shows the
  whole character and which part it is: ``🗼[1/2]``, ``🗼[2/2]`` — when the neighbouring tokens are
  known (:func:`display_tokens`); alone (:func:`display_token`) it shows its bytes: ``⟨f0 9f⟩``.

Which spelling a token uses is read off the token itself: ``▁`` or ``<0x..>`` means SentencePiece; a
string made only of byte stand-ins that decodes as UTF-8 (or as a fragment of one character) means
byte-level BPE; anything else is shown as it is. The decoded text is *not* escaped: HTML writers
escape it like any other string.

Example:
    >>> display_tokens(["ĠK", "Ã¶", "ln"])
    ['␣K', 'ö', 'ln']
    >>> display_tokens(["The", "Ġ", "ðŁ", "Ĺ¼", "Ċ"])
    ['The', '␣', '🗼[1/2]', '🗼[2/2]', '\\\\n']
    >>> display_token("▁Paris"), display_token("<0x0A>"), display_token("ĠParis")
    ('␣Paris', '\\\\n', '␣Paris')
    >>> display_token("ðŁ")
    '⟨f0 9f⟩'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

#: The visible stand-in for a space in a token.
SPACE = "␣"

_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: printable stand-in character → byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes(tok: str) -> bytes | None:
    """The bytes a token stands for, or None when it is not in a byte spelling we know.

    Byte-level BPE stand-ins are mapped back to bytes; SentencePiece ``▁`` becomes a space and
    ``<0xNN>`` the byte NN. A plain string that is neither (a word-level vocabulary) gives None.
    """
    if "▁" in tok or _SP_BYTE.search(tok):
        out = bytearray()
        pos = 0
        for m in _SP_BYTE.finditer(tok):
            out += tok[pos:m.start()].replace("▁", " ").encode()
            out.append(int(m.group(1), 16))
            pos = m.end()
        return bytes(out + tok[pos:].replace("▁", " ").encode())
    dec = _byte_decoder()
    if tok and all(c in dec for c in tok):
        raw = bytes(dec[c] for c in tok)
        return raw if _utf8_or_fragment(raw) else None
    return None


def _utf8_or_fragment(raw: bytes) -> bool:
    """``raw`` is UTF-8, possibly cut inside a character at either end (a byte-level BPE token is)."""
    lo = 0
    while lo < min(3, len(raw)) and 0x80 <= raw[lo] < 0xC0:  # the tail of a character begun before
        lo += 1
    body = raw[lo:]
    hi = len(body) - _partial_tail(body)  # the head of a character finished after
    try:
        body[:hi].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _show(text: str) -> str:
    """Decoded text with spaces and control characters made visible."""
    out = []
    for ch in text:
        if ch == " ":
            out.append(SPACE)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def display_token(tok: str) -> str:
    """One token as a reader should see it (see the module docstring); bytes of a partial character
    are shown as ``⟨f0 9f⟩``."""
    raw = token_bytes(tok)
    if raw is None:
        return _show(tok)
    try:
        return _show(raw.decode("utf-8"))
    except UnicodeDecodeError:
        pass
    text, rest = _decode_prefix(raw)
    return _show(text) + ("⟨" + " ".join(f"{b:02x}" for b in rest) + "⟩" if rest else "")


def _decode_prefix(raw: bytes) -> tuple[str, bytes]:
    """The longest decodable prefix of ``raw`` and the bytes after it."""
    for hi in range(len(raw), -1, -1):
        try:
            return raw[:hi].decode("utf-8"), raw[hi:]
        except UnicodeDecodeError:
            continue
    return "", raw  # pragma: no cover - the empty prefix always decodes


def display_tokens(tokens: Sequence[str]) -> list[str]:
    """A sequence of tokens (a prompt) for display; a character split over several tokens is shown
    whole in each of them, with the part: ``🗼[1/2]``, ``🗼[2/2]``.

    Each token's own complete characters are shown as :func:`display_token` would; the bytes it
    holds of a character that starts or ends in a neighbouring token are replaced by that character.
    """
    raws = [token_bytes(t) for t in tokens]
    out = [display_token(t) for t in tokens]
    i = 0
    while i < len(tokens):
        raw = raws[i]
        if raw is None or not _incomplete(raw):
            i += 1
            continue
        # join this token with the following byte tokens until the bytes decode
        j, buf = i, bytes(raw)
        while j + 1 < len(tokens) and raws[j + 1] is not None and _has_partial_tail(buf):
            j += 1
            buf += raws[j]  # type: ignore[operator]
        if j == i:
            i += 1
            continue
        pieces = _split_by_char(raws[i:j + 1])  # type: ignore[arg-type]
        out[i:j + 1] = pieces
        i = j + 1
    return out


def _incomplete(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def _partial_tail(buf: bytes) -> int:
    """How many bytes at the end of ``buf`` begin a character whose other bytes are missing (0: none)."""
    for k in range(1, min(4, len(buf)) + 1):
        b = buf[-k]
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return k if k < need else 0
        if b < 0x80:
            return 0
    return 0


def _has_partial_tail(buf: bytes) -> bool:
    """The bytes end inside a character (a lead byte whose continuation bytes are missing)."""
    return _partial_tail(buf) > 0


def _split_by_char(parts: Sequence[bytes]) -> list[str]:
    """Display strings for consecutive tokens' bytes: whole characters in the token that holds all of
    their bytes as themselves, a character spread over several tokens as ``char[k/n]`` in each."""
    owners: list[list[int]] = []  # for each character: the tokens holding its bytes
    chars: list[str] = []
    byte_owner = [k for k, p in enumerate(parts) for _ in p]
    buf = b"".join(parts)
    pos = 0
    while pos < len(buf):
        for width in (1, 2, 3, 4):
            try:
                ch = buf[pos:pos + width].decode("utf-8")
                break
            except UnicodeDecodeError:
                continue
        else:
            ch, width = f"\\x{buf[pos]:02x}", 1
        chars.append(ch)
        owners.append(sorted(set(byte_owner[pos:pos + width])))
        pos += width
    out = ["" for _ in parts]
    for ch, own in zip(chars, owners, strict=True):
        for k, tok_index in enumerate(own):
            out[tok_index] += _show(ch) + (f"[{k + 1}/{len(own)}]" if len(own) > 1 else "")
    return out


__all__ = ["SPACE", "display_token", "display_tokens", "token_bytes"]
