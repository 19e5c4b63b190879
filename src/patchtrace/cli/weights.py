"""``patchtrace weights …``: make, apply, remove, shrink, combine and inspect weight patches over files.

Example::

    patchtrace weights extract base.safetensors tuned.safetensors --out runs/p --select 'conv1.*,conv2.*'
    patchtrace weights info runs/p
    patchtrace weights quantize runs/p --levels 16 --scheme linear --out runs/p16
    patchtrace weights apply base.safetensors runs/p16 --out patched.safetensors --scale 0.5
    patchtrace weights remove patched.safetensors runs/p16 --out restored.safetensors
    patchtrace weights compose runs/p runs/q --weights 1,0.5 --out runs/pq

MODEL / BASE / TUNED are a safetensors file or a model folder (``*.safetensors``, sharded or not); a
folder's other files (config, tokenizer) are copied to the output folder, and each shard is written
back under its own name. A patch is a folder (``patch.safetensors`` + ``patch.json``). ``apply``
also writes an undo file next to its output (``<out>.undo.safetensors``, or
``patchtrace-undo.safetensors`` inside an output folder) with which ``remove`` restores the original
bit for bit; without it ``remove`` subtracts the delta (exact up to float rounding) and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from patchtrace.cli import common

UNDO = "patchtrace-undo.safetensors"


def _check_out_kind(model: str, out: str) -> None:
    """A model file is written to a ``.safetensors`` file, a model folder to a folder (checked before any work)."""
    m, o = Path(model), Path(out)
    if m.is_file() and o.suffix != ".safetensors":
        raise common.CLIError(f"--out {out}: MODEL {model} is one safetensors file, so --out must be a .safetensors "
                              f"file too (e.g. {o.with_suffix('.safetensors').name})")
    if m.is_dir() and o.suffix == ".safetensors":
        raise common.CLIError(f"--out {out}: MODEL {model} is a folder, so --out must be a folder (not a .safetensors file)")


def _undo_path(out: Path) -> Path:
    return out / UNDO if out.suffix != ".safetensors" else out.with_name(out.stem + ".undo.safetensors")


def _files(path: Path) -> list[Path]:
    files = sorted(f for f in path.glob("*.safetensors") if f.name != UNDO) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise common.CLIError(f"{path}: not a safetensors file or a folder holding *.safetensors weights")
    return files


def _read(path: str) -> tuple[dict[str, Any], dict[str, list[str]], dict[str, dict[str, str]]]:
    """All tensors, which file holds which names, and each file's metadata."""
    from safetensors import safe_open

    from patchtrace.weights import WeightPatchError

    p = Path(path)
    if not p.exists():
        raise common.CLIError(f"{path}: no such file or folder")
    tensors: dict[str, Any] = {}
    where: dict[str, list[str]] = {}
    metas: dict[str, dict[str, str]] = {}
    for f in _files(p):
        try:
            with safe_open(str(f), framework="pt") as h:
                metas[f.name] = dict(h.metadata() or {})
                where[f.name] = list(h.keys())
                for k in where[f.name]:
                    tensors[k] = h.get_tensor(k)
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise WeightPatchError(f"{f}: unreadable safetensors ({type(e).__name__}: {e})") from None
    return tensors, where, metas


def _write(src: str, out: str, tensors: dict[str, Any], where: dict[str, list[str]], metas: dict[str, dict[str, str]],
           overwrite: bool) -> Path:
    import shutil

    from safetensors.torch import save_file

    s, o = Path(src), Path(out)
    if o.exists() and not overwrite:
        raise common.CLIError(f"--out {o}: exists; choose another path or pass --overwrite")
    if s.is_dir():
        o.mkdir(parents=True, exist_ok=True)
        for f in s.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, o / f.name)
        for name, keys in where.items():
            save_file({k: tensors[k].contiguous() for k in keys}, str(o / name), metadata=metas[name] or None)
    else:
        o.parent.mkdir(parents=True, exist_ok=True)
        (name, keys), = where.items()
        save_file({k: tensors[k].contiguous() for k in keys}, str(o), metadata=metas[name] or None)
    return o


def _load_patch(path: str) -> Any:
    from patchtrace.weights import WeightPatch

    return WeightPatch.load(path)


def _save_patch(patch: Any, out: str, overwrite: bool) -> Path:
    from patchtrace.weights.io import is_patch_dir

    o = Path(out)
    if o.exists() and not (overwrite or (o.is_dir() and not any(o.iterdir()))):
        what = "a patch" if is_patch_dir(o) else "something"
        raise common.CLIError(f"--out {o}: already holds {what}; choose another folder or pass --overwrite")
    return patch.save(o)


def _describe(patch: Any, con: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    from patchtrace.weights.finetune import size_report

    t = Table(title=f"{len(patch.deltas)} tensors · base {patch.base_hash}", title_justify="left")
    for col in ("tensor", "shape", "values", "‖Δ‖", "stored as", "bytes"):
        t.add_column(col, justify="left" if col in ("tensor", "stored as") else "right")
    norms = patch.norms()
    for n, d in patch.deltas.items():
        q = patch.quant.get(n)
        t.add_row(Text(n), str(tuple(d.shape)), f"{d.numel():,}", f"{norms[n]:.4g}",
                  f"{q.scheme}, {q.levels} levels" if q else "float32", f"{q.nbytes if q else 4 * d.numel():,}")
    con.print(t)
    s = size_report(patch)
    con.print(Text(f"patch {s['patch_bytes']:,} bytes · full model copy {s['model_bytes']:,} bytes "
                   f"({s['model_over_patch']:.1f}× the patch) · full float32 delta {s['full_delta_bytes']:,} bytes "
                   f"({s['full_delta_over_patch']:.1f}×)"), soft_wrap=True)
    hist = patch.meta.get("history") or []
    ops = [patch.meta.get("op", "?")] + [h.get("op", "?") for h in hist]
    con.print(Text("made by: " + " → ".join(str(o) for o in ops)), soft_wrap=True)


Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing output")]


def register(app: typer.Typer) -> None:
    """Add the ``weights`` command group."""
    w = typer.Typer(help="Weight patches: extract, apply, remove, quantize, compose, info (see docs/weights.md).",
                    no_args_is_help=True)
    app.add_typer(w, name="weights")

    @w.command("extract")
    def extract(base: str, tuned: str,
                out: Annotated[str, typer.Option(help="patch folder to write")],
                select: Annotated[str | None, typer.Option(help="globs like 'conv1.*,conv2.*', 're:<regex>' or layers '3,4' (default: all)")] = None,
                overwrite: Overwrite = False) -> None:
        """TUNED − BASE for the selected tensors, saved as a patch (BASE's architecture and hash recorded)."""
        from patchtrace.weights import WeightPatch

        con = common.console()
        a, _, _ = _read(base)
        b, _, _ = _read(tuned)
        sel: Any = select
        if select and all(x.strip().isdigit() for x in select.split(",")):
            sel = [int(x) for x in select.split(",")]
        p = WeightPatch.extract(a, b, sel, meta={"base": base, "tuned": tuned})
        _describe(p, con)
        con.print(f"saved {_save_patch(p, out, overwrite)}", markup=False)

    @w.command("apply")
    def apply(model: str, patch: str,
              out: Annotated[str, typer.Option(help="patched model: a .safetensors file, or a folder for a folder")],
              scale: Annotated[float, typer.Option(help="multiply the delta by this")] = 1.0,
              allow_other_base: Annotated[bool, typer.Option("--allow-other-base", help="patch a model other than the patch's base (same architecture)")] = False,
              overwrite: Overwrite = False) -> None:
        """MODEL + scale·PATCH, written to --out (all-or-nothing; an undo file for an exact remove)."""
        from patchtrace.weights import apply_state

        con = common.console()
        _check_out_kind(model, out)
        p = _load_patch(patch)
        tensors, where, metas = _read(model)
        new, receipt = apply_state(p, tensors, scale, allow_other_base)
        o = _write(model, out, new, where, metas, overwrite)
        receipt.save(_undo_path(o))
        con.print(f"patched {len(p.deltas)} tensors (scale {scale:g}); saved {o} and its undo file "
                  f"{_undo_path(o)} ({receipt.n_fixups} elements kept for an exact remove)", markup=False)

    @w.command("remove")
    def remove(model: str, patch: str,
               out: Annotated[str, typer.Option(help="restored model (.safetensors file, or a folder)")],
               scale: Annotated[float, typer.Option(help="the scale it was applied with (without an undo file)")] = 1.0,
               undo: Annotated[str | None, typer.Option(help="undo file written by apply (default: found next to MODEL)")] = None,
               overwrite: Overwrite = False) -> None:
        """MODEL − PATCH: bit for bit the original with apply's undo file."""
        from patchtrace.weights import Receipt, base_hash, remove_state

        con = common.console()
        _check_out_kind(model, out)
        p = _load_patch(patch)
        tensors, where, metas = _read(model)
        u = Path(undo) if undo else _undo_path(Path(model))
        if undo and not u.is_file():
            raise common.CLIError(f"--undo {undo}: no such file")
        receipt = Receipt.load(u) if u.is_file() else None
        old = remove_state(p, tensors, receipt, scale)
        o = _write(model, out, old, where, metas, overwrite)
        h = base_hash({k: v for k, v in old.items()})
        exact = "bit for bit (undo file)" if receipt else "by subtraction (no undo file: exact up to float rounding)"
        same = " · matches the patch's base hash" if h == p.base_hash else ""
        con.print(f"removed {len(p.deltas)} tensors {exact}; saved {o}{same}", markup=False)

    @w.command("quantize")
    def quantize(patch: str,
                 out: Annotated[str, typer.Option(help="quantized patch folder")],
                 levels: Annotated[int, typer.Option(help="number of levels (≥ 2; log: ≥ 3)")] = 16,
                 scheme: Annotated[str, typer.Option(help="linear, log or tanh")] = "linear",
                 overwrite: Overwrite = False) -> None:
        """Store each delta on an n-level grid (bit-packed)."""
        con = common.console()
        p = _load_patch(patch)
        q = p.quantize(levels, scheme)
        err = max(float((q.deltas[n] - p.deltas[n]).abs().max()) for n in p.deltas)
        con.print(f"{p.nbytes:,} → {q.nbytes:,} bytes ({p.nbytes / q.nbytes:.1f}× smaller) · max |error| {err:.3g}", markup=False)
        con.print(f"saved {_save_patch(q, out, overwrite)}", markup=False)

    @w.command("compose")
    def compose(patches: list[str],
                out: Annotated[str, typer.Option(help="composed patch folder")],
                weights: Annotated[str | None, typer.Option(help="comma list, one weight per patch (default 1 each)")] = None,
                allow_other_base: Annotated[bool, typer.Option("--allow-other-base", help="compose patches made for different bases")] = False,
                overwrite: Overwrite = False) -> None:
        """Σ w_i · PATCH_i over the union of tensors."""
        from patchtrace.weights import WeightPatch

        con = common.console()
        ws = None
        if weights is not None:
            try:
                ws = [float(x) for x in weights.split(",")]
            except ValueError:
                raise common.CLIError(f"--weights {weights!r}: give numbers like '1,0.5'") from None
            if len(ws) != len(patches):
                raise common.CLIError(f"--weights {weights!r}: {len(ws)} weights for {len(patches)} patches")
        c = WeightPatch.compose([_load_patch(p) for p in patches], ws, allow_other_base)
        _describe(c, con)
        con.print(f"saved {_save_patch(c, out, overwrite)}", markup=False)

    @w.command("info")
    def info(patch: str) -> None:
        """Tensors, shapes, norms, storage, bytes and base hash of a patch."""
        _describe(_load_patch(patch), common.console())
