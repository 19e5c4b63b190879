"""Synthetic glyph images whose every attribute is known, and the captions that describe them.

The small text-to-image model of :mod:`patchtrace.diffusion.small` is trained on these renders, and
its attribute classifiers on the same renders: a generated image can then be *scored* per attribute
(which glyph, which colour, which background, where, which style) exactly as the LocoGen paper
scores an SD image with CLIP — but offline, on CPU, with a known ground truth.

An image is ``SIZE × SIZE`` RGB in [-1, 1]. Attributes (each a small closed vocabulary):

- ``glyph``: a 5×7 bitmap digit or letter (one image pixel per bitmap pixel);
- ``color``: the glyph's colour;
- ``background``: the canvas colour;
- ``position``: glyph on the left or on the right half (with a little jitter);
- ``style``: ``plain`` or ``boxed`` (a one-pixel frame of the glyph colour around the glyph).
  ``plain`` is never worded, so removing the style phrase from a prompt is the attribute-free prompt.

Captions come from several templates (paraphrases) so that the text encoder learns the words, not a
single sentence. Some (glyph, colour) pairs are held out of training (:data:`HELD_OUT`) to test
generalization to unseen combinations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 16

_BITMAPS = {
    "two": ["01110", "10001", "00001", "00010", "00100", "01000", "11111"],
    "three": ["11110", "00001", "00001", "01110", "00001", "00001", "11110"],
    "four": ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    "seven": ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    "x": ["10001", "10001", "01010", "00100", "01010", "10001", "10001"],
    "h": ["10001", "10001", "10001", "11111", "10001", "10001", "10001"],
}
#: caption words of each glyph
GLYPH_WORDS = {"two": "two", "three": "three", "four": "four", "seven": "seven", "x": "letter x", "h": "letter h"}

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 230), "yellow": (240, 210, 20)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
POSITIONS = ("left", "right")
STYLES = ("plain", "boxed")

#: attribute name -> its values, in class-index order
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "glyph": tuple(_BITMAPS),
    "color": tuple(COLORS),
    "background": tuple(BACKGROUNDS),
    "position": POSITIONS,
    "style": STYLES,
}

#: (glyph, colour) combinations never shown in training
HELD_OUT = (("two", "blue"), ("three", "yellow"), ("seven", "red"), ("x", "green"))

_TEMPLATES = (
    "a {color} {glyph} on a {background} background {position}{style}",
    "{glyph} in {color} on {background} {position}{style}",
    "a picture of a {color} {glyph} over {background} {position}{style}",
    "{background} background with a {color} {glyph} {position}{style}",
)
_POSITION_WORDS = {"left": "on the left", "right": "on the right"}
_STYLE_WORDS = {"plain": ("",), "boxed": (" in a box", " inside a frame")}


@dataclass(frozen=True)
class Spec:
    """One image's attributes (values of :data:`ATTRIBUTES`)."""

    glyph: str
    color: str
    background: str
    position: str
    style: str

    def labels(self) -> dict[str, int]:
        """Class index per attribute."""
        return {a: ATTRIBUTES[a].index(getattr(self, a)) for a in ATTRIBUTES}


def caption(spec: Spec, template: int = 0, style_variant: int = 0) -> str:
    """The caption of ``spec`` from template ``template`` (paraphrases differ in template)."""
    words = _STYLE_WORDS[spec.style]
    return _TEMPLATES[template % len(_TEMPLATES)].format(
        color=spec.color,
        glyph=GLYPH_WORDS[spec.glyph],
        background=spec.background,
        position=_POSITION_WORDS[spec.position],
        style=words[style_variant % len(words)],
    )


def vocabulary() -> list[str]:
    """Every word any caption can contain (sorted)."""
    words: set[str] = set()
    for t in _TEMPLATES:
        words.update(t.replace("{style}", "").split())
    for group in (GLYPH_WORDS.values(), COLORS, BACKGROUNDS, _POSITION_WORDS.values()):
        for w in group:
            words.update(w.split())
    for variants in _STYLE_WORDS.values():
        for w in variants:
            words.update(w.split())
    return sorted(w for w in words if "{" not in w)


def render(spec: Spec, rng: np.random.Generator | None = None, jitter: bool = True) -> np.ndarray:
    """The ``(3, SIZE, SIZE)`` float32 image of ``spec`` in [-1, 1].

    With ``rng`` and ``jitter`` the glyph is moved by 0-2 pixels in x and y (the classifiers learn
    from jittered renders); without, it sits at the centre of that range. The text-to-image model
    is trained without jitter (see :mod:`.train`): with it, the glyph's shape at high noise is a
    blur over nine placements and the model never learns to draw the prompted glyph.
    """
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = BACKGROUNDS[spec.background]
    jx, jy = (rng.integers(0, 3), rng.integers(0, 3)) if rng is not None and jitter else (1, 1)
    x0 = (1 if spec.position == "left" else 9) + int(jx)
    y0 = 3 + int(jy)
    color = np.array(COLORS[spec.color], np.float32)
    bitmap = np.array([[c == "1" for c in row] for row in _BITMAPS[spec.glyph]])
    img[y0 : y0 + 7, x0 : x0 + 5][bitmap] = color
    if spec.style == "boxed":
        ya, yb, xa, xb = y0 - 2, y0 + 8, max(x0 - 2, 0), min(x0 + 6, SIZE - 1)
        img[ya, xa : xb + 1] = color
        img[yb, xa : xb + 1] = color
        img[ya : yb + 1, xa] = color
        img[ya : yb + 1, xb] = color
    return (img.transpose(2, 0, 1) / 127.5 - 1.0).astype(np.float32)


def all_specs(held_out: bool | None = None) -> list[Spec]:
    """Every attribute combination; ``held_out`` True/False keeps only held-out/training ones."""
    out = []
    for g in ATTRIBUTES["glyph"]:
        for c in ATTRIBUTES["color"]:
            for b in ATTRIBUTES["background"]:
                for p in POSITIONS:
                    for s in STYLES:
                        spec = Spec(g, c, b, p, s)
                        is_held = (g, c) in HELD_OUT
                        if held_out is None or held_out == is_held:
                            out.append(spec)
    return out


def sample_batch(
    rng: np.random.Generator, n: int, specs: list[Spec], jitter: bool = True
) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """``n`` random renders of ``specs`` with random paraphrased captions and their labels."""
    idx = rng.integers(0, len(specs), n)
    images, captions = [], []
    labels: dict[str, list[int]] = {a: [] for a in ATTRIBUTES}
    for i in idx:
        spec = specs[int(i)]
        images.append(render(spec, rng, jitter))
        captions.append(caption(spec, int(rng.integers(0, 4)), int(rng.integers(0, 2))))
        for a, v in spec.labels().items():
            labels[a].append(v)
    return np.stack(images), captions, {a: np.array(v) for a, v in labels.items()}
