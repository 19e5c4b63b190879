"""``patchtrace t2i`` commands for text in images (issue 13): textloc, text-edit, prevent, text-lora.

Added to the ``t2i`` group by :func:`patchtrace.cli.t2i.register`. ``--pipeline small`` is the small
cross-attention UNet model, ``small-joint`` the small joint-attention (SD3-style MMDiT) model; both are
scored by the same attribute classifiers. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from patchtrace.cli import common

GlyphA = Annotated[str, typer.Option("--glyph-a", help="glyph of prompt A")]
GlyphB = Annotated[str, typer.Option("--glyph-b", help="glyph of prompt B (patched in)")]
Pipe = Annotated[str, typer.Option("--pipeline", help="'small' (cross-attention UNet) or 'small-joint' (MMDiT)")]
Seeds = Annotated[str, typer.Option("--seeds", help="noise seeds, e.g. 0,1")]
Steps = Annotated[int, typer.Option(help="denoising steps")]
Layers = Annotated[str, typer.Option(help="localized layers, e.g. 5,6 (see `patchtrace t2i textloc`); "
                                          "joint pipelines: 'pooled' (the pooled text path) alone or with layers, e.g. pooled,1")]


def _pipe(pipeline: str) -> Any:
    from patchtrace.diffusion.adapters import DiffusionError

    if pipeline == "small":
        from patchtrace.diffusion.small.pipeline import build_small

        return build_small()
    if pipeline == "small-joint":
        from patchtrace.diffusion.smalljoint.pipeline import build_small_joint

        return build_small_joint()
    if pipeline in ("if", "deepfloyd-if", "IFPipeline"):
        raise DiffusionError("DeepFloyd IF (added-KV attention) is not supported yet; supported: 'small', 'small-joint'")
    raise DiffusionError(f"--pipeline {pipeline!r}: expected 'small' or 'small-joint'")


def _ints(text: str, what: str) -> list[int]:
    from patchtrace.diffusion.adapters import DiffusionError

    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DiffusionError(f"{what} {text!r}: expected integers separated by commas") from None


def _common(steps: int, out: Path, seeds: str) -> list[int]:
    common.check_count(steps, "--steps")
    common.check_out(out)
    return _ints(seeds, "--seeds")


def _layers(text: str, n: int) -> list[int]:
    from patchtrace.diffusion.adapters import DiffusionError

    if not text.strip():
        raise DiffusionError("--layers is required (e.g. the localized layers of `patchtrace t2i textloc`)")
    layers = _ints(text, "--layers")
    bad = [x for x in layers if not 0 <= x < n]
    if bad:
        raise DiffusionError(f"--layers {text!r}: layer {bad[0]} does not exist (the model has {n} text-attention layers)")
    return layers


def _sites(text: str, pipe: Any) -> tuple[list[int], bool]:
    """``--layers`` with an optional ``pooled`` item (joint-attention pipelines: the pooled text path,
    where the small joint model reads the glyph; see docs/diffusion.md)."""
    from patchtrace.diffusion.textedit import check_sites

    items = [x.strip() for x in text.split(",") if x.strip()]
    pooled = "pooled" in items
    check_sites(pipe, [], pooled)
    rest = ",".join(x for x in items if x != "pooled")
    return (_layers(rest, _n_layers(pipe)) if rest or not pooled else []), pooled


def _n_layers(pipe: Any) -> int:
    if hasattr(pipe, "transformer"):
        from patchtrace.diffusion.joint import joint_layers

        return len(joint_layers(pipe))
    from patchtrace.diffusion.adapters import cross_attention_layers

    return len(cross_attention_layers(pipe.unet))


def _glyphs(*glyphs: str) -> None:
    from patchtrace.diffusion.small.prompts import check_attribute

    for g in glyphs:
        check_attribute("glyph", g)


def _dump(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str))


def add_commands(t2i: typer.Typer) -> None:
    """Register the text-in-images commands on the ``t2i`` group."""

    @t2i.command("textloc")
    def textloc(glyph_a: GlyphA = "two", glyph_b: GlyphB = "seven", pipeline: Pipe = "small",
                prompts: Annotated[int, typer.Option(help="prompt pairs")] = 4, seeds: Seeds = "0,1",
                steps: Steps = 10, per_head: Annotated[bool, typer.Option(help="joint models: one head at a time")] = False,
                out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/t2i/textloc")) -> None:  # fmt: skip
        """Which single layer (or head) decides the glyph: patch it from prompt B into A (Staniszewski et al. 2025)."""
        import torch

        from patchtrace.diffusion.joint import joint_layers
        from patchtrace.diffusion.small.data import ATTRIBUTES
        from patchtrace.diffusion.small.scorer import load_scorer
        from patchtrace.diffusion.textedit import glyph_pairs
        from patchtrace.diffusion.textloc import (
            cell_sites,
            joint_fractions,
            joint_text_localization,
            kv_fraction,
            param_fraction,  # fmt: skip
            text_localization,
        )
        from patchtrace.diffusion.textreport import textloc_report

        common.check_count(prompts, "--prompts")
        seed_list = _common(steps, out, seeds)
        _glyphs(glyph_a, glyph_b)
        pipe, sc = _pipe(pipeline), load_scorer()
        pa, pb, specs = glyph_pairs(glyph_a, glyph_b, prompts)
        others = [x for x in ATTRIBUTES if x != "glyph"]

        def agree(images: Any, pidx: Any) -> Any:
            return torch.tensor([g == glyph_b for g in sc.predict(images * 2 - 1, "glyph")]).float()

        def keep(images: Any, pidx: Any) -> Any:
            per = [torch.tensor([p == getattr(specs[int(i)], x) for p, i in zip(sc.predict(images * 2 - 1, x), pidx)]).float()
                   for x in others]  # fmt: skip
            return torch.stack(per).mean(0)

        if hasattr(pipe, "transformer"):
            n = len(joint_layers(pipe))
            # with B's pooled embedding too (pooled+L0 …, pooled+all): how the glyph splits between the
            # adaptive-norm path and the text K/V (the small joint model reads it mostly from the former)
            with_pooled: list[Any] = [] if per_head else [[j] for j in range(n)] + ["all"]
            r = joint_text_localization(pipe, pa, pb, agree, keep, seed_list, steps, per_head=per_head,
                                        pooled_with=with_pooled)  # fmt: skip
            labels = r["labels"]
            fr = [joint_fractions(pipe, *cell_sites(j, n)) for j, _ in r["cells"]]
        else:
            from patchtrace.diffusion.adapters import T2IAdapter

            a = T2IAdapter(pipe, steps=steps)
            r = text_localization(a, pa, pb, agree, keep, seed_list)
            labels = [f"L{j}" for j in range(a.n_layers)]
            fr = [(kv_fraction(a, [j]), param_fraction(a, [j])) for j in range(a.n_layers)]
        rows: list[dict[str, Any]] = [{"cell": lab, **{k: float(r[k][i]) for k in ("agree_b", "preserve", "mse", "psnr", "ssim")},
                 "kv_fraction": fr[i][0], "param_fraction": fr[i][1]} for i, lab in enumerate(labels)]  # fmt: skip
        con = common.console()
        for row in rows:
            con.print(f"{row['cell']:7s} agree B {row['agree_b']:.2f}  preserve {row['preserve']:.2f}  PSNR {row['psnr']:.1f}  "
                      f"SSIM {row['ssim']:.2f}  K/V params {100 * row['kv_fraction']:.2f}%  attention {100 * row['param_fraction']:.2f}%")  # fmt: skip
        con.print(f"plain A agrees with B {r['agree_b_plain_a']:.2f}; plain B {r['agree_b_plain_b']:.2f}")
        page = textloc_report(r, out, labels, pa, pb, [f[0] for f in fr], f"Text localization {glyph_a} -> {glyph_b} ({pipeline})")
        _dump(out / "textloc.json", {"pipeline": pipeline, "glyph_a": glyph_a, "glyph_b": glyph_b, "layers": rows,
                                     "agree_b_plain_a": r["agree_b_plain_a"], "agree_b_plain_b": r["agree_b_plain_b"]})  # fmt: skip
        con.print(f"report {page}")

    @t2i.command("text-edit")
    def text_edit_cmd(glyph_a: GlyphA = "two", glyph_b: GlyphB = "seven", layers: Layers = "",
                      t_starts: Annotated[str, typer.Option("--t-starts", help="patch start steps, e.g. 0,2,4")] = "0,2,4",
                      pipeline: Pipe = "small", prompts: Annotated[int, typer.Option(help="prompt pairs")] = 4,
                      seeds: Seeds = "0,1", steps: Steps = 10,
                      out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/t2i/text-edit")) -> None:  # fmt: skip
        """Training-free glyph editing: the localized layers read prompt B from step t_start on."""
        from patchtrace.diffusion.small.scorer import load_scorer
        from patchtrace.diffusion.textedit import check_t_start, text_edit
        from patchtrace.diffusion.textreport import text_edit_report

        common.check_count(prompts, "--prompts")
        seed_list = _common(steps, out, seeds)
        _glyphs(glyph_a, glyph_b)
        ts = _ints(t_starts, "--t-starts")
        for t in ts:
            check_t_start(t, steps)
        pipe = _pipe(pipeline)
        lay, pooled = _sites(layers, pipe)
        r = text_edit(pipe, load_scorer(), glyph_a, glyph_b, lay, ts, prompts, seed_list, steps, pooled=pooled)
        con = common.console()
        for row in r["rows"]:
            con.print(f"{row['t_start']!s:8s} success {row['success']:.2f}  preserve {row['preserve']:.2f}  "
                      f"PSNR {row['psnr']:.1f}  SSIM {row['ssim']:.2f}")  # fmt: skip
        page = text_edit_report(r, out, f"Glyph editing {glyph_a} -> {glyph_b}, layers {lay}{' + pooled' * pooled} ({pipeline})")
        _dump(out / "text_edit.json", {"pipeline": pipeline, "layers": lay, "pooled": pooled, "rows": r["rows"]})
        con.print(f"report {page}")

    @t2i.command("prevent")
    def prevent_cmd(forbidden: Annotated[str, typer.Option(help="glyph never to be drawn")] = "two",
                    neutral: Annotated[str, typer.Option(help="glyph drawn instead (same token length)")] = "seven",
                    layers: Layers = "", compare_all: Annotated[bool, typer.Option(help="also edit every layer")] = True,
                    lam: Annotated[float, typer.Option("--lambda", help="regularization λ")] = 0.01,
                    seeds: Seeds = "0,1", steps: Steps = 10,
                    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/t2i/prevent")) -> None:  # fmt: skip
        """Closed-form edit of the localized layers' W_k/W_v so the forbidden glyph is drawn as the neutral one."""
        from patchtrace.diffusion.adapters import T2IAdapter
        from patchtrace.diffusion.prevent import _check_words, evaluate_prevention, prevention_patch
        from patchtrace.diffusion.small.scorer import load_scorer
        from patchtrace.diffusion.textreport import prevention_report

        seed_list = _common(steps, out, seeds)
        common.check_finite(lam, "--lambda")
        if lam < 0:
            raise common.CLIError(f"--lambda {lam}: must be 0 or more")
        _glyphs(forbidden, neutral)
        a = T2IAdapter(_pipe("small"), steps=steps)
        _check_words(a, forbidden, neutral)
        lay = _layers(layers, a.n_layers)
        sc = load_scorer()
        arms = {f"layers {lay}": lay, **({"all layers": list(range(a.n_layers))} if compare_all else {})}
        evals, con = {}, common.console()
        for name, ls in arms.items():
            patch = prevention_patch(a, ls, forbidden, neutral, lam)
            patch.save(out / f"patch_{'_'.join(map(str, ls))}")
            evals[name] = evaluate_prevention(a, sc, patch, forbidden, neutral, seed_list)
            e = evals[name]
            con.print(f"{name}: forbidden drawn {e['forbidden_drawn_before']:.2f} -> {e['forbidden_drawn_after']:.2f}; "
                      f"neutral {e['neutral_drawn_before']:.2f} -> {e['neutral_drawn_after']:.2f}; other prompts "
                      f"{e['others_all_attrs_before']:.2f} -> {e['others_all_attrs_after']:.2f} (SSIM {e['others_ssim']:.2f})")  # fmt: skip
        page = prevention_report(evals, out, f"Prevention of {forbidden!r} (drawn as {neutral!r})")
        _dump(out / "prevent.json", {k: {x: y for x, y in e.items() if x != "images"} for k, e in evals.items()})
        con.print(f"report {page}")

    @t2i.command("text-lora")
    def text_lora_cmd(layers: Layers = "", pipeline: Pipe = "small", steps_train: Annotated[int, typer.Option("--train-steps", help="LoRA steps")] = 100,
                      rank: Annotated[int, typer.Option(help="LoRA rank")] = 4,
                      lr: Annotated[float, typer.Option(help="learning rate")] = 1e-3,
                      batch: Annotated[int, typer.Option(help="batch size")] = 32,
                      prompts: Annotated[int, typer.Option(help="evaluation prompts per set")] = 24,
                      seeds: Seeds = "0,1", steps: Steps = 10,
                      out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/t2i/text-lora")) -> None:  # fmt: skip
        """LoRA on the localized layers only vs on every attention layer: glyph accuracy on hard prompts."""
        from patchtrace.diffusion.adapters import T2IAdapter
        from patchtrace.diffusion.small.scorer import load_scorer
        from patchtrace.diffusion.textlora import accuracy_sets, text_lora
        from patchtrace.diffusion.textreport import lora_report

        seed_list = _common(steps, out, seeds)
        for v, name in ((steps_train, "--train-steps"), (rank, "--rank"), (batch, "--batch"), (prompts, "--prompts")):
            common.check_count(v, name)
        common.check_finite(lr, "--lr")
        if lr <= 0:
            raise common.CLIError(f"--lr {lr}: must be more than 0")
        pipe = _pipe(pipeline)
        a = pipe if hasattr(pipe, "transformer") else T2IAdapter(pipe, steps=steps)
        lay, pooled = _sites(layers, pipe)
        sc = load_scorer()
        base = accuracy_sets(a, sc, seed_list, prompts)
        runs = [text_lora(a, sc, arm, lay, steps_train, lr, rank, batch, seeds=seed_list, n_eval=prompts, pooled=pooled)
                for arm in ("localized", "all")]  # fmt: skip
        con = common.console()
        con.print(f"unchanged: hard {base['hard']}  train {base['train']}")
        for r in runs:
            r["patch"].save(out / f"lora_{r['arm']}")
            con.print(f"{r['arm']}: trainable {r['trainable']} ({100 * r['trainable_fraction']:.3f}%), {r['seconds']} s; "
                      f"hard {r['after']['hard']}  train {r['after']['train']}")  # fmt: skip
        page = lora_report(base, runs, out, f"LoRA on localized layers vs all attention layers ({pipeline})")
        strip = lambda d: {k: v for k, v in d.items() if "images" not in k}  # noqa: E731
        _dump(out / "text_lora.json", {"unchanged": strip(base),
                                       "arms": [{**{k: v for k, v in r.items() if k not in ("patch", "after")},
                                                 "after": strip(r["after"])} for r in runs]})  # fmt: skip
        con.print(f"report {page}")
