"""The debugger's output: the table (print_report) and the heatmap (plot)."""
from __future__ import annotations

import math
import sys

import numpy as np

from .session import Report

STAGE = {"activation": "forward", "loss": "forward", "activation_grad": "backward", "param_grad": "backward",
         "optimizer": "optimizer"}


def _fmt(v):
    if isinstance(v, float) and not math.isfinite(v):
        return f"{v!r:>9}"
    return f"{v:9.2e}"


def print_report(rep: Report, diff_only: bool = False, out=None) -> None:
    out = out or sys.stdout
    s = rep.setup
    B, T = s.ids.shape
    side = "manual" if rep.other == "manual" else "dump"
    print(f"layerdiff: {side} vs reference | {s.label} | batch {B}x{T} | "
          f"{len(rep.rows)} tensors" + (f" + {len(rep.opt_rows)} optimizer comparisons" if rep.opt_rows else ""),
          file=out)
    header = f"{'stage':<9} {'tensor':<44} {'shape':<16} {'max_abs':>9} {'max_rel':>10} {'tol':>9}  verdict"
    print(header, file=out)
    print("-" * len(header), file=out)
    skipped = 0
    for c in rep.rows + rep.opt_rows:
        if diff_only and c.passed:
            skipped += 1
            continue
        if skipped:
            print(f"{'':<9} ... {skipped} tensor(s) agree", file=out)
            skipped = 0
        name = c.tensor + (f" [step {c.step}]" if c.step is not None else "")
        print(f"{STAGE.get(c.check, c.check):<9} {name:<44} {str(tuple(c.shape)):<16} {_fmt(c.max_abs)} "
              f"{_fmt(c.max_rel):>10} {_fmt(c.tol)}  {'OK' if c.passed else 'DIFF'}", file=out)
    if skipped:
        print(f"{'':<9} ... {skipped} tensor(s) agree", file=out)
    print("-" * len(header), file=out)
    if rep.absent and rep.other != "manual":
        print(f"absent from the dump (not compared): {len(rep.absent)}: {', '.join(rep.absent[:8])}"
              + (" ..." if len(rep.absent) > 8 else ""), file=out)
    n_diff = sum(not c.passed for c in rep.rows + rep.opt_rows)
    if rep.ok:
        print(f"all {len(rep.rows) + len(rep.opt_rows)} tensors agree ({rep.seconds:.1f} s)", file=out)
        return
    f = rep.first
    print(f"{n_diff} tensor(s) differ. First divergent tensor: {f.tensor}"
          + (f" at step {f.step}" if f.step is not None else ""), file=out)
    print(f"  written by: {rep.first_where}" + ("  [here: the same layer of the dumped implementation]"
                                                if rep.other != "manual" else ""), file=out)
    print(f"  worst element {tuple(f.worst_index)}: {side} {f.a_value!r} vs reference {f.b_value!r} "
          f"(|diff| {f.max_abs:.3g}, tol {f.tol:.3g})" + (f"  [{f.note}]" if f.note else ""), file=out)
    if rep.blame is not None:
        print_blame(rep.blame, out)
    print(f"({rep.seconds:.1f} s)", file=out)


def print_blame(b, out) -> None:
    for check in b.checks:
        print(f"  check of {check.layer}: {check.method}", file=out)
        if check.error:
            print(f"    could not run: {check.error}", file=out)
        for side, sc in check.sides.items():
            shown = ", ".join(f"{k} {v:.2e}" + (" (WRONG)" if sc.tol is not None and v > sc.tol else "")
                              for k, v in sc.errors.items())
            tol = f"  [tol {sc.tol:.2e}]" if sc.tol is not None else ""
            print(f"    {side:<10} {'agrees' if sc.agrees else 'DISAGREES'}" + (f": {shown}{tol}" if shown else ""),
                  file=out)
        if check.note:
            print(f"    note: {check.note}", file=out)
    print(f"  wrong side: {b.verdict}", file=out)
    if b.origin:
        print(f"  backward first wrong in: {b.origin}  (inferred from parameter gradients: the dump holds no tap "
              f"gradients)", file=out)
    if b.detail:
        print(f"  ({b.detail})", file=out)


# -- the heatmap -------------------------------------------------------------------------------------

def _cell(name: str):
    """(row, column) of the forward/backward heatmap for a tensor name."""
    base = name[len("grad."):] if name.startswith("grad.") else name
    if base.startswith("transformer.h."):
        _, _, i, rest = base.split(".", 3)
        return f"h.{i}", rest
    if base.startswith("h."):
        _, i, rest = base.split(".", 2)
        return f"h.{i}", rest
    if base.startswith("transformer."):
        layer, rest = base[len("transformer."):].split(".", 1)
        return ("embed", f"{layer}.{rest}") if layer in ("wte", "wpe") else (layer, rest)
    if base.startswith("mtp."):
        _, j, rest = base.split(".", 2)
        return f"mtp.{j}", rest
    if base == "embed.out":
        return "embed", "out"
    if base == "ln_f.out":
        return "ln_f", "out"
    if base in ("logits", "loss"):
        return "head", base
    if base == "lm_head.weight":
        return "head", "lm_head.weight"
    return base, base


def _opt_cell(c) -> tuple:
    """(row, column) of the optimizer heatmap: the step, and what was compared (worst over parameters)."""
    what = c.tensor.split(".", 1)[1]                  # drop the optimizer kind
    if what.startswith("optim."):
        col = what.split(".")[1]                      # exp_avg, exp_avg_sq, momentum_buffer
    else:
        col = what.split(".")[0]                      # loss, grad, grad_norm, clipped_grad, param
    return f"step {c.step}", col


def _row_order(row: str):
    if row == "embed":
        return (0, 0)
    if row.startswith("h."):
        return (1, int(row.split(".")[1]))
    if row.startswith("mtp."):
        return (3, int(row.split(".")[1]))
    if row.startswith("step "):
        return (6, int(row.split()[1]))
    return {"ln_f": (2, 0), "head": (4, 0)}.get(row, (5, 0))


LOG_LIMIT = 6.0       # the colour scale: log10(error / tolerance) clipped to [-6, 6]
BOUNDS = [-6, -4, -2, -1, 0, 1, 2, 4, 6]
COLORS = ["#00441b", "#238b45", "#74c476", "#c7e9c0",      # agrees: dark green (far inside) -> pale
          "#fdae6b", "#f16913", "#d94801", "#7f2704"]       # differs: orange -> dark red


def _grid(rows, cell):
    """(row names, column names, log10 badness grid with NaN where nothing was compared)."""
    rnames, cnames = [], []
    for c in rows:
        r, k = cell(c)
        rnames += [r] if r not in rnames else []
        cnames += [k] if k not in cnames else []
    rnames.sort(key=_row_order)                       # layers top to bottom in forward order
    grid = np.full((len(rnames), len(cnames)), np.nan)
    for c in rows:
        r, k = cell(c)
        v = math.log10(max(c.badness, 1e-300))
        v = max(-LOG_LIMIT, min(LOG_LIMIT, v if math.isfinite(v) else LOG_LIMIT))
        i, j = rnames.index(r), cnames.index(k)
        grid[i, j] = v if np.isnan(grid[i, j]) else max(grid[i, j], v)
    return rnames, cnames, grid


def plot(rep: Report, path) -> None:
    """Heatmap of log10(max_abs / tol) per layer and tensor (forward, backward) and, after an
    optimizer walk, per step and quantity. Green agrees, orange/red differs (x), grey was not
    compared; the first divergent cell is boxed in blue."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Rectangle

    cmap = ListedColormap(COLORS).with_extremes(bad="#d9d9d9")
    norm = BoundaryNorm(BOUNDS, cmap.N)
    panels = [("forward: activations", "tensor written by the layer",
               [c for c in rep.rows if not c.tensor.startswith("grad.")], lambda c: _cell(c.tensor)),
              ("backward: gradients", "gradient (of a tap or a parameter of the layer)",
               [c for c in rep.rows if c.tensor.startswith("grad.")], lambda c: _cell(c.tensor))]
    if rep.opt_rows:
        panels.append(("optimizer steps (worst over parameters)", "quantity compared after the step",
                       rep.opt_rows, _opt_cell))
    grids = [_grid(rows, cell) for _title, _xlabel, rows, cell in panels]
    widths = [max(len(cnames), 4) for _r, cnames, _g in grids]        # one column width for every panel
    n_rows = max(len(rnames) for rnames, _c, _g in grids)
    fig, axes = plt.subplots(1, len(panels), figsize=(0.27 * sum(widths) + 1.2 * len(panels) + 1.5,
                                                      0.42 * n_rows + 3.4),
                             squeeze=False, gridspec_kw=dict(width_ratios=widths))
    first = rep.first
    for n, (ax, (title, xlabel, rows, cell), (rnames, cnames, grid)) in enumerate(zip(axes[0], panels, grids)):
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
        ax.set_xticks(range(len(cnames)))
        ax.set_xticklabels(cnames, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rnames)))
        ax.set_yticklabels(rnames, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=9)
        if cell is _opt_cell:
            ax.set_ylabel("optimizer step", fontsize=9)
        elif n == 0:
            ax.set_ylabel("layer (forward order, top to bottom)", fontsize=9)
        ax.set_title(title, fontsize=10)
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v) and v > 0:
                ax.text(j, i, "x", ha="center", va="center", fontsize=9, color="white", fontweight="bold")
        if first is not None and any(c is first for c in rows):
            r, k = cell(first)
            i, j = rnames.index(r), cnames.index(k)
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#2166ac", linewidth=3))
            ax.annotate("first", (j, i - 0.5), xytext=(0, 4), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8, color="#2166ac", fontweight="bold", annotation_clip=False)
    cbar = fig.colorbar(im, ax=axes[0].tolist(), fraction=0.025, pad=0.02, ticks=BOUNDS)
    cbar.set_label("log10(max_abs / tolerance)\n<= 0 agrees (green), > 0 differs (red, x); grey: not compared",
                   fontsize=9)
    where = "none: every tensor agrees" if first is None else \
        first.tensor + (f" at step {first.step}" if first.step is not None else "")
    fig.suptitle(f"layerdiff: {'manual' if rep.other == 'manual' else 'dump'} vs reference | {rep.setup.label}\n"
                 f"first divergent tensor: {where}", fontsize=11)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
