"""Console summary of a run: STS before and after training."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from sempa_exp.data.sts import SHORT_NAMES

ROWS = [*SHORT_NAMES.values(), "sts_avg", "stsb_dev", "uniformity", "isotropy"]


def summary_table(results: dict) -> Table:
    start, final = results.get("start", {}), results.get("final", {})
    table = Table(title=f"{results['group']}/{results['name']}: {results['backbone']}, {results['embed']}, "
                        f"{results['data_size']} triplets, {results['samples_seen']} samples seen")
    table.add_column("metric")
    table.add_column("step 0 (untrained)", justify="right")
    table.add_column(f"step {results['final_step']} (trained)", justify="right")
    table.add_column("delta", justify="right")
    for name in ROWS:
        a, b = start.get(f"eval/{name}"), final.get(f"eval/{name}")
        if a is None and b is None:
            continue
        fmt = "{:.4f}" if name in ("uniformity", "isotropy") else "{:.2f}"
        table.add_row(name, "-" if a is None else fmt.format(a), "-" if b is None else fmt.format(b),
                      "-" if a is None or b is None else ("{:+.4f}" if fmt == "{:.4f}" else "{:+.2f}").format(b - a))
    return table


def print_summary(results: dict) -> None:
    Console().print(summary_table(results))
