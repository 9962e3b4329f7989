"""The per-layer factor report: a rich table, plain text without a terminal, and a dict.

One row per layer in forward order: name, op, weight shape, output shape, ``s``, ``c``,
backward factor ``m``, current scale ``1/(m·s)``, optional effective learning rate per
optimizer the plan is attached to, optional competitor rates, and the notes naming every
approximation used.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from ..runtime.norms import sumsq
from ..runtime.reference import lars_rate, lsalr_rate

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = ["build_table", "print_report", "render_text", "plan_to_dict"]

COMPARABLE = ("lars", "lsalr", "sgd", "backmatch")


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if x == 0 or (1e-3 <= abs(x) < 1e4):
        return f"{x:.4g}"
    return f"{x:.3e}"


def _shape(s) -> str:
    return "×".join(str(d) for d in s) if s else "—"


def _compare_rates(plan: "Plan", name: str, rules: Sequence[str]) -> dict[str, float | None]:
    """The competitors' rates from the weight and its ``.grad`` as they are now: before an
    attached step (after one, the gradient is the rescaled one)."""
    p = plan._params[name]
    out: dict[str, float | None] = {}
    w_sq = float(sumsq(p))
    g = p.grad
    g_sq = None if g is None else float(sumsq(g))
    for r in rules:
        if r == "lars":
            out[r] = None if g_sq is None else lars_rate(w_sq, g_sq, plan.trust_coefficient)
        elif r == "lsalr":
            out[r] = None if g_sq is None else lsalr_rate(g_sq)
        elif r == "sgd":
            out[r] = 1.0
        elif r == "backmatch":
            out[r] = None
        else:
            raise ValueError(f"cannot compare with {r!r}; choose from {COMPARABLE}")
    return out


def _title(plan: "Plan") -> str:
    covered = len(plan.targets)
    total = sum(1 for p in plan.model.parameters() if p.requires_grad)
    shapes = ", ".join(_shape(s) for s in (plan.input_shapes or ()))
    return (
        f"fxbackmatch · {type(plan.model).__name__} · rule={plan.rule} · input {shapes} · "
        f"{covered}/{total} parameters scaled" + (" · capture=hooks" if plan.capture == "hooks" else "")
    )


def plan_to_dict(plan: "Plan", compare: Sequence[str] = ()) -> dict[str, Any]:
    """The report's figures, JSON-serializable."""
    scales = plan.scales()
    lrs = [h.effective_lrs() for h in plan._attached]
    moved = plan.last_updates()
    rows = []
    for rec in plan.layers:
        main = rec.params[0][0] if rec.params else None
        row: dict[str, Any] = {
            "name": rec.name,
            "op": rec.kind,
            "node": rec.node,
            "weight_shape": list(rec.weight_shape) if rec.weight_shape else None,
            "input_shape": list(rec.input_shape) if rec.input_shape else None,
            "output_shape": list(rec.output_shape) if rec.output_shape else None,
            "s": rec.s,
            "c": rec.c,
            "m": rec.m if plan.rule == "backmatch" else None,  # the chain is back-matching's
            "scale": scales.get(main, 1.0) if main else None,
            "params": {n: {"role": role, "scale": scales.get(n, 1.0)} for n, role in rec.params},
            "notes": list(rec.notes) + (["kept at scale 1 (adapt='weights')"] if main and main not in plan.targets else []),
        }
        if main in moved:
            row["rel_update"] = moved[main]
        if lrs and main:
            row["effective_lr"] = [next((g[main] for g in groups if main in g), None) for groups in lrs]
        if compare and main:
            row["compare"] = _compare_rates(plan, main, compare)
        rows.append(row)
    return {
        "model": type(plan.model).__name__,
        "rule": plan.rule,
        "capture": plan.capture,
        "outputs": list(plan._analysis.outputs),
        "input_shapes": [list(s) for s in (plan.input_shapes or ())],
        "scaled": len(plan.targets),
        "trainable": sum(1 for p in plan.model.parameters() if p.requires_grad),
        "layers": rows,
        # what each attached optimizer's column holds: lr·scale, or the step-length mode's T/‖u‖
        "effective_lr_kinds": [h.mode for h in plan._attached],
        "uncovered": plan.uncovered_reasons,
        "notes": list(plan.notes),
        "title": _title(plan),
    }


def note_legend(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Each distinct note -> its short marker (``1``, ``2``, …), in order of appearance."""
    legend: dict[str, str] = {}
    for row in rows:
        for n in row["notes"]:
            legend.setdefault(n, str(len(legend) + 1))
    return legend


def build_table(plan: "Plan", compare: Sequence[str] = (), *, plain: bool = False, d: dict | None = None) -> Table:
    d = d or plan_to_dict(plan, compare)
    legend = note_legend(d["layers"])
    t = Table(box=box.ASCII if plain else box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("layer", overflow="ellipsis", no_wrap=True, max_width=24)
    t.add_column("op", overflow="ellipsis", no_wrap=True, max_width=12)
    t.add_column("weight", overflow="ellipsis", no_wrap=True, max_width=12)
    t.add_column("output", overflow="ellipsis", no_wrap=True, max_width=12)
    for c in ("s", "c", "m", "scale"):
        t.add_column(c, justify="right", no_wrap=True)
    n_opt = max((len(r.get("effective_lr", [])) for r in d["layers"]), default=0)
    kinds = d.get("effective_lr_kinds", [])
    for i in range(n_opt):
        head = "T/‖u‖" if i < len(kinds) and kinds[i] == "length" else "lr·scale"  # the length mode's ratio
        t.add_column(f"{head}{'' if n_opt == 1 else f' #{i}'}", justify="right")
    tracked = any("rel_update" in r for r in d["layers"])
    if tracked:
        t.add_column("‖ΔW‖/‖W‖", justify="right")
    for r in compare:
        t.add_column(f"{r} rate", justify="right")
    t.add_column("notes", no_wrap=True, min_width=5)
    for row in d["layers"]:
        cells = [
            row["name"], row["op"], _shape(row["weight_shape"]), _shape(row["output_shape"][1:] if row["output_shape"] else None),
            _fmt(row["s"]), _fmt(row["c"]), _fmt(row["m"]), _fmt(row["scale"]),
        ]
        lrs = row.get("effective_lr", [])
        cells += [_fmt(lrs[i]) if i < len(lrs) else "" for i in range(n_opt)]
        if tracked:
            cells.append(_fmt(row.get("rel_update")))
        cells += [_fmt(row.get("compare", {}).get(r)) for r in compare]
        cells.append(",".join(legend[n] for n in row["notes"]))
        t.add_row(*cells)
    return t


def _render(plan: "Plan", console: Console, compare: Sequence[str], plain: bool) -> None:
    console.print(_title(plan), highlight=False, style=None if plain else "bold")
    d = plan_to_dict(plan, compare)
    console.print(build_table(plan, compare, plain=plain, d=d))
    for text, mark in note_legend(d["layers"]).items():
        console.print(f"  [{mark}] {text}", highlight=False, markup=False)
    if d["outputs"] and plan.outputs is not None:
        console.print(f"loss outputs: {', '.join(d['outputs'])}", highlight=False, markup=False)
    for flag in plan.flags:
        console.print(f"out of range: {flag}", highlight=False, markup=False)
    d_unc = plan.uncovered_reasons
    if d_unc:
        console.print(f"Not covered (scale 1): {len(d_unc)} parameter(s)")
        for n, why in d_unc.items():
            console.print(f"  {n}: {why}", highlight=False, markup=False)
    for note in plan.notes:  # notes hold brackets (E[x²]): never rich markup
        console.print(f"note: {note}", highlight=False, markup=False)


def render_text(plan: "Plan", compare: Sequence[str] = (), width: int = 100) -> str:
    """The report as plain text that fits ``width`` columns (for logs and non-terminals)."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None, force_terminal=False, no_color=True)
    _render(plan, console, compare, plain=True)
    return buf.getvalue()


def print_report(plan: "Plan", compare: Sequence[str] = (), *, width: int | None = None, console: Console | None = None) -> None:
    """Print the report: a rich table on a terminal, plain text (≤ 100 columns) otherwise."""
    if console is None:
        console = Console(width=width)
        if not console.is_terminal:
            console = Console(width=width or 100, color_system=None, no_color=True)
    _render(plan, console, compare, plain=not console.is_terminal)
