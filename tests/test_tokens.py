"""Tokens shown decoded (patchtrace.tokens), checked against the tokenizer's own decode."""

from __future__ import annotations

import re

import pytest

from patchtrace.tokens import SPACE, display_token, display_tokens, token_bytes

TEXT = " Köln 🗼🇫🇷 naïve\tcafé\n Ünïcödé—“quotes” 東京"


def _plain(shown: str) -> str:
    """Undo the display conventions: ␣ → space, \\n/\\t back, part markers dropped."""
    return re.sub(r"\[\d/\d\]", "", shown).replace(SPACE, " ").replace("\\n", "\n").replace("\\t", "\t")


def test_matches_tokenizer_decode(smol_tokenizer):
    """Every token of a multilingual, emoji-laden text reads as the tokenizer decodes it."""
    ids = smol_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    toks = smol_tokenizer.convert_ids_to_tokens(ids)
    shown = display_tokens(toks)
    assert len(shown) == len(toks)
    for i, (t, s) in enumerate(zip(toks, shown, strict=True)):
        ref = smol_tokenizer.decode([ids[i]])
        if "\ufffd" not in ref:  # a whole-character token: exactly the decoded text
            assert _plain(s) == ref, (t, s, ref)
        else:  # part of a character: the character it belongs to, with its part number
            assert re.search(r"\[\d/\d\]", s), (t, s)
    # no byte-level stand-ins survive (the 'ðŁ Ĺ ¼', 'Ã¶', 'Ġ')
    assert not any(c in "".join(shown) for c in "ĠĊðŁĹÃ"), shown
    # the characters split over tokens are whole in the display
    joined = "".join(shown)
    for ch in ("🗼", "ö", "東"):
        assert ch in joined


def test_leading_space_visible():
    assert display_token("ĠParis") == "␣Paris" and display_token("Paris") == "Paris"
    assert display_token("▁Paris") == "␣Paris"


@pytest.mark.parametrize(
    ("tok", "shown"),
    [("Ċ", "\\n"), ("ĉ", "\\t"), ("<0x0A>", "\\n"), ("ĠK", "␣K"), ("Ã¶", "ö"), ("ðŁ", "⟨f0 9f⟩"), ("Ā", "\\x00")],
)
def test_single_tokens(tok, shown):
    assert display_token(tok) == shown


def test_not_byte_spelling_left_alone():
    # a word-level token with a Latin-1 letter that is not valid UTF-8 as bytes: shown as it is
    assert token_bytes("Köln") is None and display_token("Köln") == "Köln"
    assert display_token("a b") == "a␣b"


def test_error_messages_show_decoded_tokens(smol_tokenizer):
    """The issue's `['ĠK','Ã¶','ln']` for " Köln": an error names the tokens as a reader sees them."""
    from patchtrace.tasks.base import Example, Task, TaskError

    task = Task("t", [Example("The city is", "The town is", " Köln", " Paris")])
    with pytest.raises(TaskError) as e:
        task.tokenize(smol_tokenizer)
    assert "['␣K', 'ö', 'ln']" in str(e.value) and "Ã" not in str(e.value)
