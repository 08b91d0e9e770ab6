"""``Plan.summary()``: the plan's widths and bytes per op, as a rich table."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from actfx.config import KEEP_EXACT
from actfx.planner.plan import CHECKPOINT
from actfx.units import format_bytes


def render(plan, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    terminal = console.is_terminal
    table = Table(title=f"actfx plan: {plan.budget}" if plan.budget else "actfx plan", title_justify="left",
                  box=box.SIMPLE_HEAD if terminal else None, pad_edge=False, header_style="bold" if terminal else "")
    for column in ("module", "op", "bits", "bytes", "variance share"):
        table.add_column(column, justify="left" if column in ("module", "op") else "right", overflow="fold")
    total = plan.gradient_variance or 0.0
    for site in plan.sites:
        if site.variance is None:
            share = "not measured"
        else:
            share = f"{100 * site.variance / total:.1f}%" if total > 0 else "-"
        bits = "recompute" if site.op == CHECKPOINT else "exact" if site.bits == KEEP_EXACT else str(site.bits)
        table.add_row(site.module or "<root>", site.op, bits, format_bytes(site.bytes), share)
    console.print(table)
    rerun = f", {len(plan.recomputed)} module(s) recomputed in backward" if plan.recomputed else ""
    rerun += ", attention reads its packed probabilities (attention_math)" if plan.attention_math else ""
    console.print(
        f"batch {plan.batch}: held for backward {format_bytes(plan.activation_bytes)}, average "
        f"{plan.average_bits:.2f} bits{rerun}, predicted peak {format_bytes(plan.predicted_peak_bytes)}",
        highlight=False)
