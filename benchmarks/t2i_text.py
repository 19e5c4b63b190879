"""Benchmarks of issue 13 (text in images) on the small UNet and small joint-attention models (CPU, 1 thread).

    nice -n 10 .venv/bin/python benchmarks/t2i_text.py --out runs/t2i/text-bench [--what accuracy,textloc,edit,prevent,lora]

Writes one JSON per section and ``bench.md`` (tables for BENCHMARKS.md) into ``--out``, image grids and
curves into ``--img`` (default ``docs/img/diffusion``). Sections:

- ``accuracy``: generation accuracy per attribute of both models on the same specs and seeds;
- ``textloc``: per-layer (UNet) and per-layer + per-head (joint) text localization on glyph pairs; the
  localized layer = the best agreement with B (ties: higher SSIM); parameter fractions next to the paper's;
- ``edit``: training-free editing from ``t_start`` on the localized layers (both models; on the joint model the
  site set may include the pooled text embedding: ``--joint-layers pooled`` or ``pooled,0,1``);
- ``prevent``: closed-form prevention on the UNet, localized layers vs all layers;
- ``lora``: LoRA on the localized layers vs all attention layers (UNet).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchtrace.diffusion.adapters import T2IAdapter
from patchtrace.diffusion.small.data import ATTRIBUTES, all_specs
from patchtrace.diffusion.small.pipeline import build_small
from patchtrace.diffusion.small.scorer import load_scorer

PAIRS = [("two", "seven"), ("three", "four")]
PAPER = [("SDXL (paper)", "3/70", 0.61), ("SD3 (paper)", "1/24", 0.23), ("DeepFloyd IF (paper)", "1/22", 0.21)]


def _joint() -> Any:
    from patchtrace.diffusion.smalljoint.pipeline import build_small_joint

    return build_small_joint()


def _save(out: Path, name: str, obj: Any) -> None:
    (out / f"{name}.json").write_text(json.dumps(obj, indent=1, default=str))


def _img(src: Path, img: Path, name: str) -> None:
    img.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, img / name)


def accuracy_section(out: Path, sc: Any, seeds: list[int]) -> dict[str, Any]:
    from patchtrace.diffusion.small.evaluate import accuracy as unet_acc
    from patchtrace.diffusion.smalljoint.evaluate import accuracy as joint_acc

    rng = np.random.default_rng(0)  # the UNet benchmark's protocol (benchmarks/t2i.py): 64 training combos, all 48 held-out
    res: dict[str, Any] = {}
    a, j = T2IAdapter(build_small(), steps=10), _joint()
    for held in (False, True):
        pool = all_specs(held)
        specs = pool if held else [pool[int(i)] for i in rng.choice(len(pool), 64, replace=False)]
        key = "held-out" if held else "train"
        res[f"unet {key}"] = unet_acc(a, sc, specs, seeds)
        res[f"joint {key}"] = joint_acc(j, sc, specs, seeds)
    return res


def _agree_keep(sc: Any, glyph_b: str, specs: list[Any]) -> tuple[Any, Any]:
    others = [x for x in ATTRIBUTES if x != "glyph"]

    def agree(images: Any, pidx: Any) -> Any:
        return torch.tensor([g == glyph_b for g in sc.predict(images * 2 - 1, "glyph")]).float()

    def keep(images: Any, pidx: Any) -> Any:
        return torch.stack([torch.tensor([p == getattr(specs[int(i)], x) for p, i in zip(sc.predict(images * 2 - 1, x), pidx)]).float()
                            for x in others]).mean(0)  # fmt: skip

    return agree, keep


def textloc_section(out: Path, img: Path, sc: Any, seeds: list[int], n: int, archs: list[str]) -> dict[str, Any]:
    from patchtrace.diffusion.textedit import glyph_pairs
    from patchtrace.diffusion.textloc import (
        cell_sites,
        joint_fractions,
        joint_text_localization,
        kv_fraction,
        param_fraction,
        text_localization,
    )
    from patchtrace.diffusion.textreport import textloc_report

    old = out / "textloc.json"
    res: dict[str, Any] = json.loads(old.read_text()) if old.exists() else {}
    for arch in archs:
        acc: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for ga, gb in PAIRS:
            pa, pb, specs = glyph_pairs(ga, gb, n)
            agree, keep = _agree_keep(sc, gb, specs)
            if arch == "unet":
                a = T2IAdapter(build_small(), steps=10)
                r = text_localization(a, pa, pb, agree, keep, seeds)
                labels = [f"L{j}" for j in range(a.n_layers)]
                fr = [(kv_fraction(a, [j]), param_fraction(a, [j])) for j in range(a.n_layers)]
            else:
                pipe = _joint()
                groups = [] if arch == "joint-heads" else [list(range(i, i + w)) for w in (2, 3) for i in range(0, 7 - w)]
                # B's pooled embedding together with each block, each window and all blocks' text K/V
                with_pooled: list[Any] = [] if arch == "joint-heads" else [[j] for j in range(6)] + groups + ["all"]
                r = joint_text_localization(pipe, pa, pb, agree, keep, seeds, 10, per_head=arch == "joint-heads",
                                            groups=groups, pooled_with=with_pooled)  # fmt: skip
                labels = r["labels"]
                fr = [joint_fractions(pipe, *cell_sites(j, 6)) for j, _ in r["cells"]]
            for k in ("agree_b", "preserve", "psnr", "ssim"):
                acc.setdefault(k, []).append(r[k].tolist())
            acc.setdefault("plain_a", []).append(r["agree_b_plain_a"])
            acc.setdefault("plain_b", []).append(r["agree_b_plain_b"])
            if (ga, gb) == PAIRS[0]:
                textloc_report(r, out / f"textloc_{arch}", labels, pa, pb, [f[0] for f in fr], f"Text localization ({arch}) {ga} -> {gb}")
                _img(out / f"textloc_{arch}" / "textloc_grid.png", img, f"textloc_{arch}_grid.png")
                _img(out / f"textloc_{arch}" / "textloc_curves.png", img, f"textloc_{arch}_curves.png")
            elif arch == "joint":  # the second pair's curves too: the pooled path alone moves one pair, not the other
                textloc_report(r, out / f"textloc_{arch}_{ga}", labels, pa, pb, [f[0] for f in fr], f"Text localization ({arch}) {ga} -> {gb}")
                _img(out / f"textloc_{arch}_{ga}" / "textloc_curves.png", img, f"textloc_{arch}_{ga}-{gb}_curves.png")
        mean = {k: np.mean(np.array(v), 0).tolist() for k, v in acc.items()}
        score = [g + 1e-3 * s if lab[1:].isdigit() else -1.0 for g, s, lab in zip(mean["agree_b"], mean["ssim"], labels)]
        best = int(np.argmax(score))
        res[arch] = {"labels": labels, **mean, "agree_b_pairs": acc["agree_b"], "plain_b_pairs": acc["plain_b"],
                     "kv_fraction": [f[0] for f in fr], "attn_fraction": [f[1] for f in fr],
                     "localized": labels[best], "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        rule = localized_by_rule(res[arch])
        if arch == "joint" and rule is not None:  # the site set the applications use: by the rule, pooled path allowed
            layers, pooled = cell_sites(r["cells"][rule][0], 6)
            res[arch]["localized"] = labels[rule]
            res[arch]["localized_sites"] = {"layers": layers, "pooled": pooled}
    return res


def localized_by_rule(r: dict[str, Any], every_pair: bool = False) -> int | None:
    """The localized site set: the cell with the fewest parameters (its K/V, plus the pooled projection when
    it patches the pooled embedding) whose patch draws B's glyph at least half as often as prompt B itself
    (ties: higher agreement); ``None`` if no cell does. ``every_pair``: on each glyph pair, not on average."""
    if every_pair:
        good = [all(a[i] >= 0.5 * b for a, b in zip(r["agree_b_pairs"], r["plain_b_pairs"])) for i in range(len(r["labels"]))]
    else:
        good = [r["agree_b"][i] >= 0.5 * np.mean(r["plain_b"]) for i in range(len(r["labels"]))]
    ok = [(r["kv_fraction"][i], -r["agree_b"][i], i) for i in range(len(r["labels"])) if good[i]]
    return min(ok)[2] if ok else None


Sites = tuple[list[int], bool]  # a joint site set: text-K/V layers, and whether the pooled projection is in it


def _where(sites: Sites) -> list[Any]:
    return (["pooled"] if sites[1] else []) + list(sites[0])


def edit_section(out: Path, img: Path, sc: Any, seeds: list[int], n: int, loc: dict[str, list[int]],
                 archs: list[str], pooled: bool = False, extra: Sequence[Sites] = (),
                 pair: tuple[str, str] = PAIRS[0]) -> dict[str, Any]:  # fmt: skip
    from patchtrace.diffusion.textedit import text_edit
    from patchtrace.diffusion.textreport import text_edit_report

    old = out / "edit.json"
    res: dict[str, Any] = json.loads(old.read_text()) if old.exists() else {}
    ga, gb = pair
    runs: list[tuple[str, str, Sites]] = [(x, "", (loc[x], pooled and x == "joint")) for x in archs if x in ("unet", "joint")]
    runs += [("joint", "_" + "_".join(f"L{w}" if isinstance(w, int) else w for w in _where(e)), e) for e in extra if "joint" in archs]
    for arch, suffix, sites in runs:
        pipe = build_small() if arch == "unet" else _joint()
        r = text_edit(pipe, sc, ga, gb, sites[0], [0, 1, 2, 4, 6], n, seeds, 10, pooled=sites[1])
        text_edit_report(r, out / f"edit_{arch}{suffix}", f"Glyph editing ({arch}) {ga} -> {gb}, sites {_where(sites)}")
        _img(out / f"edit_{arch}{suffix}" / "edit_grid.png", img, f"text_edit_{arch}{suffix}_grid.png")
        res[f"{arch}{suffix.replace('_', ' ')}"] = {"layers": _where(sites), "rows": r["rows"]}
    return res


def prevent_section(out: Path, img: Path, sc: Any, seeds: list[int], loc: list[int], arch: str = "unet",
                    pooled: bool = False, extra: Sequence[Sites] = (), pair: tuple[str, str] = PAIRS[0]) -> dict[str, Any]:  # fmt: skip
    from patchtrace.diffusion.prevent import evaluate_prevention, joint_prevention_patch, prevention_patch
    from patchtrace.diffusion.textreport import prevention_report

    a: Any = T2IAdapter(build_small(), steps=10) if arch == "unet" else _joint()
    n = a.n_layers if arch == "unet" else 6
    evals = {}
    arms: list[tuple[str, list[int], bool]] = [(f"localized {_where((loc, pooled))}", loc, pooled)]
    arms += [(f"{_where(e)}", e[0], e[1]) for e in extra]
    arms.append((f"all {n} layers", list(range(n)), False))
    if pooled or any(e[1] for e in extra):
        arms.append((f"pooled + all {n} layers", list(range(n)), True))
    for name, layers, pool in arms:
        if arch == "unet":
            patch = prevention_patch(a, layers, *pair)
        else:
            patch = joint_prevention_patch(a, layers, *pair, seeds=seeds, pooled=pool)
        evals[name] = evaluate_prevention(a, sc, patch, *pair, seeds)
    suffix = "" if arch == "unet" else "_joint"
    prevention_report(evals, out / f"prevent{suffix}", f"Prevention of '{pair[0]}' (drawn as '{pair[1]}'), {arch}")
    _img(out / f"prevent{suffix}" / "prevent_grid.png", img, f"prevent{suffix}_grid.png")
    return {k: {x: y for x, y in e.items() if x not in ("images", "prompts")} for k, e in evals.items()}


def lora_section(out: Path, img: Path, sc: Any, seeds: list[int], loc: list[int], steps: int, arch: str = "unet",
                 lr: float = 1e-3, pooled: bool = False, extra: Sequence[Sites] = ()) -> dict[str, Any]:  # fmt: skip
    from patchtrace.diffusion.textlora import accuracy_sets, text_lora
    from patchtrace.diffusion.textreport import lora_report

    a: Any = T2IAdapter(build_small(), steps=10) if arch == "unet" else _joint()
    base = accuracy_sets(a, sc, seeds)
    sets = [(loc, pooled), *extra]
    runs = [text_lora(a, sc, "localized", ly, steps=steps, lr=lr, seeds=seeds, pooled=pl) for ly, pl in sets]
    runs.append(text_lora(a, sc, "all", [], steps=steps, lr=lr, seeds=seeds))
    suffix = "" if arch == "unet" else "_joint"
    lora_report(base, runs, out / f"lora{suffix}", f"LoRA localized vs all attention layers, {arch}")
    _img(out / f"lora{suffix}" / "lora_grid.png", img, f"text_lora{suffix}_grid.png")
    strip = lambda d: {k: v for k, v in d.items() if "images" not in k}  # noqa: E731
    return {"unchanged": strip(base), "arms": [{**{k: v for k, v in r.items() if k not in ("patch", "after")},
                                                "after": strip(r["after"])} for r in runs]}  # fmt: skip


def _f(x: float) -> str:
    return f"{x:.2f}"


def write_md(out: Path) -> Path:
    """``bench.md``: every section's table from the JSON files present in ``out``."""
    load = lambda n: json.loads((out / f"{n}.json").read_text()) if (out / f"{n}.json").exists() else None  # noqa: E731
    md: list[str] = []
    acc = load("accuracy")
    if acc:
        md += ["| model, combinations | " + " | ".join(ATTRIBUTES) + " |", "|---" * (len(ATTRIBUTES) + 1) + "|"]
        md += [f"| {k} | " + " | ".join(_f(v[a]) for a in ATTRIBUTES) + " |" for k, v in acc.items()] + [""]
    tl = load("textloc")
    if tl:
        for arch, r in tl.items():
            md += [f"**{arch}** (pairs {PAIRS}; plain A agrees with B {np.mean(r['plain_a']):.2f}, plain B "
                   f"{np.mean(r['plain_b']):.2f}; localized: {r['localized']}; {r['seconds']} s)", "",
                   "| cell | agree B | per pair | preserve A | PSNR | SSIM | K/V params | attention params |",
                   "|---|---|---|---|---|---|---|---|"]  # fmt: skip
            pairs = r.get("agree_b_pairs")
            md += [f"| {lab} | {_f(r['agree_b'][i])} | {' / '.join(_f(p[i]) for p in pairs) if pairs else '—'} | "
                   f"{_f(r['preserve'][i])} | {r['psnr'][i]:.1f} | {_f(r['ssim'][i])} | "
                   f"{100 * r['kv_fraction'][i]:.2f}% | {100 * r['attn_fraction'][i]:.2f}% |" for i, lab in enumerate(r["labels"])]  # fmt: skip
            md.append("")
        md += ["| model | localized / layers | parameter fraction (K/V of the localized layers) |", "|---|---|---|"]
        md += [f"| {m} | {n} | {v:.2f}% |" for m, n, v in PAPER]
        for arch in ("unet", "joint"):
            if arch in tl:
                r = tl[arch]
                i_rule = localized_by_rule(r)
                n_single = sum(lab[1:].isdigit() for lab in r["labels"])
                if i_rule is None:
                    md.append(f"| small {arch} (here) | none of {n_single} | — |")
                    continue
                rules: list[tuple[str, int | None]] = [("", i_rule)]
                if "plain_b_pairs" in r:
                    rules.append((", on every pair", localized_by_rule(r, every_pair=True)))
                for how, i in rules:
                    if i is None:
                        md.append(f"| small {arch} (here{how}) | none of {n_single} | — |")
                        continue
                    lab = r["labels"][i]
                    sites = "pooled projection" if lab == "pooled" else lab.replace("pooled+", "pooled projection + ")
                    md.append(f"| small {arch} (here{how}) | {sites} of {n_single} {'layers' if arch == 'unet' else 'blocks'} (agree B {_f(r['agree_b'][i])}) | "
                              f"{100 * r['kv_fraction'][i]:.2f}% (whole attention modules {100 * r['attn_fraction'][i]:.2f}%) |")  # fmt: skip
        md.append("")
    ed = load("edit")
    if ed:
        for arch, r in ed.items():
            md += [f"**{arch}**, layers {r['layers']}", "", "| t_start | success (glyph = B) | preserve A | PSNR | SSIM |",
                   "|---|---|---|---|---|"]  # fmt: skip
            md += [f"| {x['t_start']} | {_f(x['success'])} | {_f(x['preserve'])} | {x['psnr']:.1f} | {_f(x['ssim'])} |" for x in r["rows"]]
            md.append("")
    for pv_name in ("prevent", "prevent_joint"):
        pv = load(pv_name)
        if not pv:
            continue
        md.append(f"**{'UNet' if pv_name == 'prevent' else 'joint'}**")
        md.append("")
        md += ["| edited layers | forbidden drawn | neutral drawn | forbidden prompts' other attributes | other prompts' attributes | other prompts PSNR / SSIM vs unedited |",
               "|---|---|---|---|---|---|"]  # fmt: skip
        md += [f"| {k} | {_f(e['forbidden_drawn_before'])} → {_f(e['forbidden_drawn_after'])} | {_f(e['neutral_drawn_before'])} → "
               f"{_f(e['neutral_drawn_after'])} | {_f(e['forbidden_other_attrs_before'])} → {_f(e['forbidden_other_attrs_after'])} | "
               f"{_f(e['others_all_attrs_before'])} → {_f(e['others_all_attrs_after'])} | {e['others_psnr']:.1f} / {_f(e['others_ssim'])} |"
               for k, e in pv.items()] + [""]  # fmt: skip
    for lo_name in ("lora", "lora_joint"):
        lo = load(lo_name)
        if not lo:
            continue
        md += [f"**{'UNet' if lo_name == 'lora' else 'joint'}**", ""]
        others = [a for a in ATTRIBUTES if a != "glyph"]
        mean = lambda d, o=others: sum(d[a] for a in o) / len(o)  # noqa: E731
        u = lo["unchanged"]
        md += ["| arm | trainable params | share | time | glyph, hard | glyph, train | other attributes, hard |", "|---|---|---|---|---|---|---|",
               f"| unchanged | 0 | 0 | — | {_f(u['hard']['glyph'])} | {_f(u['train']['glyph'])} | {_f(mean(u['hard']))} |"]  # fmt: skip
        md += [f"| LoRA {r['arm']} ({r['layers']}) | {r['trainable']} | {100 * r['trainable_fraction']:.2f}% | {r['seconds']} s | "
               f"{_f(r['after']['hard']['glyph'])} | {_f(r['after']['train']['glyph'])} | {_f(mean(r['after']['hard']))} |"
               for r in lo["arms"]] + [""]  # fmt: skip
    path = out / "bench.md"
    path.write_text("\n".join(md))
    return path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("runs/t2i/text-bench"))
    p.add_argument("--img", type=Path, default=Path("docs/img/diffusion"))
    p.add_argument("--what", default="accuracy,textloc,edit,prevent,lora")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--lora-steps", type=int, default=100)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--archs", default="unet,joint,joint-heads", help="architectures of textloc/edit")
    p.add_argument("--unet-layers", default="", help="override the localized UNet layers (default: from textloc)")
    p.add_argument("--joint-layers", default="",
                   help="override the joint model's localized sites: layers and/or 'pooled' (default: from textloc)")
    p.add_argument("--pair", default="two,seven", help="glyph pair of edit (A,B) and prevention (forbidden,neutral)")
    p.add_argument("--joint-extra", default="", help="further joint site sets to compare, ';'-separated (e.g. 'pooled,1')")
    a = p.parse_args()
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    what, seeds, sc = a.what.split(","), [int(s) for s in a.seeds.split(",")], load_scorer()
    if "accuracy" in what:
        _save(a.out, "accuracy", accuracy_section(a.out, sc, seeds))
    if "textloc" in what:
        _save(a.out, "textloc", textloc_section(a.out, a.img, sc, seeds, a.prompts, a.archs.split(",")))
    tl = json.loads((a.out / "textloc.json").read_text()) if (a.out / "textloc.json").exists() else {}
    loc = {arch: [int(tl[arch]["localized"][1:])] if arch in tl and tl[arch]["localized"][1:].isdigit() else [6]
           for arch in ("unet", "joint")}  # fmt: skip
    pooled = False  # the joint model's site set includes its pooled text projection
    if "joint" in tl and "localized_sites" in tl["joint"]:
        loc["joint"], pooled = tl["joint"]["localized_sites"]["layers"], tl["joint"]["localized_sites"]["pooled"]
    if a.unet_layers:
        loc["unet"] = [int(x) for x in a.unet_layers.split(",")]
    if a.joint_layers:
        toks = a.joint_layers.split(",")
        loc["joint"], pooled = [int(x) for x in toks if x != "pooled"], "pooled" in toks
    g1, g2 = a.pair.split(",")
    pair = (g1, g2)
    extra = [([int(x) for x in e.split(",") if x != "pooled"], "pooled" in e.split(",")) for e in a.joint_extra.split(";") if e]
    if "edit" in what:
        _save(a.out, "edit", edit_section(a.out, a.img, sc, seeds, a.prompts, loc, a.archs.split(","), pooled, extra, pair))
    if "prevent" in what:
        _save(a.out, "prevent", prevent_section(a.out, a.img, sc, seeds, loc["unet"], pair=pair))
    if "lora" in what:
        _save(a.out, "lora", lora_section(a.out, a.img, sc, seeds, loc["unet"], a.lora_steps, lr=a.lora_lr))
    if "prevent-joint" in what:
        _save(a.out, "prevent_joint", prevent_section(a.out, a.img, sc, seeds, loc["joint"], "joint", pooled, extra, pair))
    if "lora-joint" in what:
        _save(a.out, "lora_joint", lora_section(a.out, a.img, sc, seeds, loc["joint"], a.lora_steps, "joint", a.lora_lr,
                                                pooled, extra))  # fmt: skip
    print(write_md(a.out).read_text())


if __name__ == "__main__":
    main()
