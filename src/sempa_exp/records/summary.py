"""Console tables of a finished run: STS before and after training, or one method's scores."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from sempa_exp.data.sts import SHORT_NAMES
from sempa_exp.records.results import Results

ROWS = [*SHORT_NAMES.values(), "sts_avg", "stsb_dev", "uniformity", "isotropy"]
FOUR_DECIMALS = ("uniformity", "isotropy", "gar")


def _number(value: Any) -> float | None:
    """A recorded score as a float: NaN and inf come back from JSON files as strings ("nan"); None when absent."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def training_table(results: Results) -> Table:
    start, final = results.start, results.final
    table = Table(title=f"{results.group}/{results.name}: {results.backbone}, {results.embed}, "
                        f"{results.data_size} triplets, {results.samples_seen} samples seen")
    table.add_column("metric")
    table.add_column("step 0 (untrained)", justify="right")
    table.add_column(f"step {results.final_step} (trained)", justify="right")
    table.add_column("delta", justify="right")
    for name in ROWS:
        a, b = _number(start.get(f"eval/{name}")), _number(final.get(f"eval/{name}"))
        if a is None and b is None:
            continue
        fmt = "{:.4f}" if name in FOUR_DECIMALS else "{:.2f}"
        table.add_row(name, "-" if a is None else fmt.format(a), "-" if b is None else fmt.format(b),
                      "-" if a is None or b is None else ("{:+.4f}" if fmt == "{:.4f}" else "{:+.2f}").format(b - a))
    return table


def evaluation_table(results: Results) -> Table:
    table = Table(title=f"{results.group}/{results.name}: method={results.method}, backbone={results.backbone}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in [*ROWS, "gar"]:
        value = _number(results.final.get(f"eval/{name}"))
        if value is not None:
            table.add_row(name, f"{value:.4f}" if name in FOUR_DECIMALS else f"{value:.2f}")
    return table


def print_training_summary(results: Results) -> None:
    Console().print(training_table(results))


def print_evaluation_summary(results: Results) -> None:
    Console().print(evaluation_table(results))
