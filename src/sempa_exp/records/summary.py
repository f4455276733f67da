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
    """Step 0 against the final step, and against the best-by-dev checkpoint when eval.at_best scored one."""
    start, final, best = results.start, results.final, results.best_checkpoint
    table = Table(title=f"{results.group}/{results.name}: {results.backbone}, {results.embed}, "
                        f"{results.data_size} triplets, {results.samples_seen} samples seen")
    columns = [("step 0 (untrained)", start), (f"step {results.final_step} (trained)", final)]
    if best:
        columns.append((f"best by STS-B dev: step {best['step']}", best))
    table.add_column("metric")
    for title, _ in columns:
        table.add_column(title, justify="right")
    table.add_column("delta (best - step 0)" if best else "delta", justify="right")
    for name in ROWS:
        values = [_number(row.get(f"eval/{name}")) for _, row in columns]
        if all(v is None for v in values):
            continue
        fmt = "{:.4f}" if name in FOUR_DECIMALS else "{:.2f}"
        a = values[0]
        b = values[-1] if values[-1] is not None else values[1]  # the delta of the best checkpoint, else the final
        table.add_row(name, *("-" if v is None else fmt.format(v) for v in values),
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
