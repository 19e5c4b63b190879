"""``patchtrace t2i``: localize and edit attributes in text-to-image models (LocoGen, LocoEdit).

Commands run on the project's small trained model (``--pipeline small``, the default: every figure
can be reproduced offline on CPU) or on a diffusers folder (``--pipeline PATH``; the attribute
classifiers are the small model's, so an attribute it has no classifier for is refused before any
denoising step). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from patchtrace.cli import common

PipelineOpt = Annotated[str, typer.Option("--pipeline", help="'small' (bundled) or a local diffusers folder")]
AttrOpt = Annotated[str, typer.Option("--attribute", help="glyph, color, background, position or style")]
ValueOpt = Annotated[str, typer.Option("--value", help="the attribute's value (e.g. boxed, red, seven)")]
SeedsOpt = Annotated[str, typer.Option("--seeds", help="noise seeds, e.g. 0,1,2,3")]
OutOpt = Annotated[Path, typer.Option("--out", help="output folder")]


def _adapter(pipeline: str, steps: int, guidance: float) -> Any:
    from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter

    if pipeline == "small":
        from patchtrace.diffusion.small.pipeline import build_small

        return T2IAdapter(build_small(), steps=steps, guidance=guidance)
    path = Path(pipeline)
    if not path.is_dir():
        raise DiffusionError(f"--pipeline {pipeline!r}: not 'small' and not a local folder")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return T2IAdapter(pipe, steps=steps, guidance=guidance)


def _scorer(attribute: str, value: str) -> Any:
    from patchtrace.diffusion.small.prompts import check_attribute
    from patchtrace.diffusion.small.scorer import load_scorer

    check_attribute(attribute, value)
    sc = load_scorer()

    def score(images: Any, pidx: Any) -> Any:
        return sc.prob(images * 2 - 1, attribute, value)

    return sc, score


def _seeds(text: str) -> list[int]:
    from patchtrace.diffusion.adapters import DiffusionError

    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DiffusionError(f"--seeds {text!r}: expected integers separated by commas") from None


def _check_guidance(guidance: float) -> None:
    common.check_finite(guidance, "--guidance")
    if guidance < 0:
        raise common.CLIError(f"--guidance {guidance}: must be 0 or more (1 = no guidance)")


def register(app: typer.Typer) -> None:
    """Add the ``t2i`` command group."""
    t2i = typer.Typer(help="Text-to-image: LocoGen localization, LocoEdit editing, text-encoder tracing, text in images.")
    app.add_typer(t2i, name="t2i")
    from patchtrace.cli._t2i_text import add_commands

    add_commands(t2i)  # textloc, text-edit, prevent, text-lora (issue 13)

    @t2i.command("info")
    def info(pipeline: PipelineOpt = "small") -> None:
        """Cross-attention layers in forward order (and the small model's training record)."""
        a = _adapter(pipeline, 10, 3.0)
        con = common.console()
        for layer in a.layers:
            con.print(f"{layer.index:3d}  {layer.block:4s}  heads={layer.heads}  kv={layer.inner_dim}  {layer.name}")
        if pipeline == "small":
            from patchtrace.diffusion.small.train import WEIGHTS_DIR

            meta = json.loads((WEIGHTS_DIR / "small_t2i.json").read_text())
            con.print(f"trained: {meta['recipe']} in {meta['train_seconds']} s, sha256 {meta['sha256'][:16]}")

    @t2i.command("localize")
    def localize(
        attribute: AttrOpt = "style",
        value: ValueOpt = "boxed",
        pipeline: PipelineOpt = "small",
        window: Annotated[int, typer.Option(help="layers per window")] = 2,
        prompts: Annotated[int, typer.Option(help="prompts stating the attribute")] = 4,
        seeds: SeedsOpt = "0,1",
        steps: Annotated[int, typer.Option(help="denoising steps")] = 10,
        guidance: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 3.0,
        naive: Annotated[bool, typer.Option(help="one pipeline call per row (the paper's loop)")] = False,
        neurons: Annotated[int, typer.Option(help="also ablate the top-k K/V neurons of the best window")] = 0,
        out: OutOpt = Path("runs/t2i/localize"),
    ) -> None:
        """LocoGen: the attribute-score drop when a window of layers gets the altered prompt."""
        from patchtrace.diffusion.locogen import locogen, windows
        from patchtrace.diffusion.report import locogen_report
        from patchtrace.diffusion.small.prompts import attribute_prompts

        common.check_count(window, "--window")
        common.check_count(prompts, "--prompts")
        common.check_count(steps, "--steps")
        _check_guidance(guidance)
        common.check_count(neurons, "--neurons", low=0)
        common.check_out(out)
        _sc, score = _scorer(attribute, value)
        seed_list = _seeds(seeds)
        a = _adapter(pipeline, steps, guidance)
        windows(a.n_layers, window)  # refuse a bad window before anything runs
        ps, alts, _ = attribute_prompts(attribute, value, prompts)
        with common.progress("windows") as bar:
            r = locogen(a, ps, alts, score, window=window, seeds=seed_list, batched=not naive,
                        checkpoint=out / "checkpoint", on_progress=bar.update)  # fmt: skip
        r.scores.save(out / "scores")
        page = locogen_report(r, out, f"{attribute}={value}")
        con = common.console()
        for lab, v in zip(r.scores.labels["window"], r.scores.values.tolist()):
            con.print(f"{lab:8s} drop {v:+.3f}")
        best = r.best_window()
        con.print(f"best window {list(best)}; unintervened {r.scores.baselines['clean']:.3f}; report {page}")
        if neurons:
            from patchtrace.diffusion.neurons import neuron_ablation
            from patchtrace.diffusion.small.prompts import attribute_prompts as ap

            neutral = ap(attribute, value, prompts, seed=1)[1]
            res = neuron_ablation(a, ps, neutral, list(best), neurons, score, seed_list)
            con.print(f"top-{neurons} neurons of {list(best)} set to neutral mean: score {res['score']:.3f} -> "
                      f"{res['ablated_score']:.3f}")  # fmt: skip
            (out / "neurons.json").write_text(json.dumps({k: v for k, v in res.items() if k != "images"}, indent=1))

    @t2i.command("edit")
    def edit(
        attribute: AttrOpt = "style",
        value: ValueOpt = "boxed",
        layers: Annotated[str, typer.Option(help="cross-attention layers to edit, e.g. 3,4 (see localize)")] = "",
        pipeline: PipelineOpt = "small",
        prompts: Annotated[int, typer.Option(help="concept prompts")] = 8,
        lam: Annotated[float, typer.Option("--lambda", help="regularization λ")] = 0.01,
        seeds: SeedsOpt = "0,1",
        steps: Annotated[int, typer.Option(help="denoising steps")] = 10,
        out: OutOpt = Path("runs/t2i/edit"),
    ) -> None:
        """LocoEdit: closed-form edit of W_k/W_v of the given layers; saves the weight patch and its effect."""
        from patchtrace.diffusion.adapters import DiffusionError
        from patchtrace.diffusion.edit_eval import evaluate_edit
        from patchtrace.diffusion.locoedit import locoedit

        if not layers.strip():
            raise DiffusionError("--layers is required (e.g. the best window of `patchtrace t2i localize`)")
        layer_list = list(common.parse_layers(layers) or ())
        common.check_count(prompts, "--prompts")
        common.check_finite(lam, "--lambda")
        if lam < 0:
            raise common.CLIError(f"--lambda {lam}: must be 0 or more")
        common.check_count(steps, "--steps")
        seed_list = _seeds(seeds)
        common.check_out(out)
        sc, _ = _scorer(attribute, value)
        a = _adapter(pipeline, steps, 3.0)
        bad = [x for x in layer_list if x >= a.n_layers]
        if bad:
            raise common.CLIError(f"--layers {layers!r}: layer {bad[0]} out of range (the pipeline has {a.n_layers} "
                                  "cross-attention layers)")
        from patchtrace.diffusion.small.prompts import attribute_prompts

        concept, anchors, _ = attribute_prompts(attribute, value, prompts, seed=5)
        patch = locoedit(a, layer_list, concept, anchors, lam)
        patch.save(out / "patch")
        rep = evaluate_edit(a, sc, patch, attribute, value, seed_list)
        (out / "edit.json").write_text(json.dumps(rep, indent=1))
        con = common.console()
        for k, v in rep.items():
            con.print(f"{k}: {v}")

    @t2i.command("trace-text")
    def trace_text(
        attribute: AttrOpt = "color",
        value: ValueOpt = "red",
        pipeline: PipelineOpt = "small",
        prompts: Annotated[int, typer.Option(help="prompts")] = 4,
        seeds: SeedsOpt = "0,1",
        steps: Annotated[int, typer.Option(help="denoising steps")] = 10,
        out: OutOpt = Path("runs/t2i/trace-text"),
    ) -> None:
        """Causal tracing on the text encoder: restore one layer at the attribute's words."""
        from patchtrace.diffusion.small.data import GLYPH_WORDS
        from patchtrace.diffusion.small.prompts import attribute_prompts
        from patchtrace.diffusion.te_trace import trace_text_encoder

        common.check_count(prompts, "--prompts")
        common.check_count(steps, "--steps")
        seed_list = _seeds(seeds)
        common.check_out(out)
        _, score = _scorer(attribute, value)
        a = _adapter(pipeline, steps, 3.0)
        ps, _, _specs = attribute_prompts(attribute, value, prompts)
        words = {"glyph": GLYPH_WORDS.get(value, value), "style": None}.get(attribute, value)
        word_list = [w if w is not None else ("box" if "box" in p else "frame") for p, w in zip(ps, [words] * len(ps))]
        s, _, _ = trace_text_encoder(a, ps, word_list, score, seed_list)
        s.save(out / "scores")
        con = common.console()
        con.print(f"clean {s.baselines['clean']:.3f}  corrupted {s.baselines['corrupt']:.3f}")
        for i, v in enumerate(s.values.tolist()):
            con.print(f"text-encoder layer {i}: restored effect {v:+.3f}")
