"""Attribute classifiers: the scorer of the small model's images (LocoGen's CLIP score, here exact).

One small CNN with a head per attribute of :data:`.data.ATTRIBUTES`, trained on renders of *every*
combination (the held-out ones included: the classifiers judge images, they do not generate them)
with Gaussian noise and brightness jitter, so that the slightly imperfect pixels a diffusion model
produces are still read correctly. ``score(images, attribute, value)`` is the classifier's
probability of ``value`` — LocoGen's localization score, whose drop under an intervention says the
intervened layers carried the attribute.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from patchtrace.errors import PatchtraceError

SCORER_RECIPE = {"seed": 1, "steps": 400, "batch": 128, "lr": 3e-3, "threads": 1}


def build_classifier() -> Any:
    """The multi-head CNN (untrained)."""
    import torch
    from torch import nn

    from patchtrace.diffusion.small.data import ATTRIBUTES

    class AttributeClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
                nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.ReLU(),
                nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),
            )  # fmt: skip
            self.heads = nn.ModuleDict({a: nn.Linear(128, len(v)) for a, v in ATTRIBUTES.items()})

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = self.body(x)
            return {a: head(h) for a, head in self.heads.items()}

    return AttributeClassifier()


def _augment(x: Any, rng: Any) -> Any:
    import numpy as np

    n = x.shape[0]
    sigma = rng.uniform(0, 0.3, (n, 1, 1, 1)).astype(np.float32)
    shift = rng.uniform(-0.1, 0.1, (n, 3, 1, 1)).astype(np.float32)
    return np.clip(x + sigma * rng.standard_normal(x.shape).astype(np.float32) + shift, -1, 1)


def train_scorer(out: Path, recipe: dict[str, Any] = SCORER_RECIPE) -> dict[str, Any]:
    """Train the classifiers; write ``scorer.safetensors`` + ``scorer.json`` (accuracy on clean renders)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from patchtrace.diffusion.small import data

    torch.set_num_threads(recipe["threads"])
    torch.manual_seed(recipe["seed"])
    rng = np.random.default_rng(recipe["seed"])
    clf, specs, t0 = build_classifier(), data.all_specs(), time.time()
    opt = torch.optim.Adam(clf.parameters(), lr=recipe["lr"])
    for _step in range(recipe["steps"]):
        x, _, labels = data.sample_batch(rng, recipe["batch"], specs)
        logits = clf(torch.from_numpy(_augment(x, rng)))
        loss = sum(torch.nn.functional.cross_entropy(logits[a], torch.from_numpy(y)) for a, y in labels.items())
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
    x, _, labels = data.sample_batch(np.random.default_rng(123), 1000, specs)
    with torch.no_grad():
        logits = clf(torch.from_numpy(_augment(x, np.random.default_rng(7))))
    acc = {a: float((logits[a].argmax(-1).numpy() == y).mean()) for a, y in labels.items()}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "scorer.safetensors"
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(path))
    meta = {
        "recipe": recipe,
        "noisy_render_accuracy": acc,
        "train_seconds": round(time.time() - t0, 1),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    (out / "scorer.json").write_text(json.dumps(meta, indent=1))
    return meta


class AttributeScorer:
    """The trained classifiers behind a small API: ``predict`` classes, ``prob`` of a value.

    Images are ``(n, 3, 16, 16)`` tensors in [-1, 1] (what the small pipeline returns).
    """

    def __init__(self, clf: Any) -> None:
        from patchtrace.diffusion.small.data import ATTRIBUTES

        self.clf = clf.eval()
        self.attributes = ATTRIBUTES

    def _check(self, attribute: str, value: str | None = None) -> None:
        if attribute not in self.attributes:
            raise PatchtraceError(
                f"no classifier for attribute {attribute!r}; the small model's are {sorted(self.attributes)}"
            )
        if value is not None and value not in self.attributes[attribute]:
            raise PatchtraceError(
                f"attribute {attribute!r} has no value {value!r}; its values are {list(self.attributes[attribute])}"
            )

    def probs(self, images: Any, attribute: str) -> Any:
        """Class probabilities ``(n, n_values)`` of ``attribute``."""
        import torch

        self._check(attribute)
        with torch.no_grad():
            return self.clf(images.float())[attribute].softmax(-1)

    def predict(self, images: Any, attribute: str) -> list[str]:
        """The predicted value of ``attribute`` per image."""
        vals = self.attributes[attribute]
        return [vals[int(i)] for i in self.probs(images, attribute).argmax(-1)]

    def prob(self, images: Any, attribute: str, value: str) -> Any:
        """Probability of ``value`` per image — the localization score."""
        self._check(attribute, value)
        return self.probs(images, attribute)[:, self.attributes[attribute].index(value)]


def load_scorer(folder: Path | None = None) -> AttributeScorer:
    """The committed classifiers (checked against their sha256)."""
    from safetensors.torch import load_file

    from patchtrace.diffusion.small.train import WEIGHTS_DIR

    folder = folder or WEIGHTS_DIR
    path = folder / "scorer.safetensors"
    meta = json.loads((folder / "scorer.json").read_text())
    if hashlib.sha256(path.read_bytes()).hexdigest() != meta["sha256"]:
        raise PatchtraceError(f"{path} does not match the sha256 in scorer.json (corrupted or replaced)")
    clf = build_classifier()
    clf.load_state_dict(load_file(str(path)))
    return AttributeScorer(clf)
