"""The published table cells `hf-fsad reproduce` compares with, shipped as package data (tables/*.csv: rows
copied unchanged from the extracted paper tables by scripts/paper_tables.py, with their `source_file` and
`source_line`), and the comparison of one cell: both values in percentage points, the difference, the
tolerance and whether it holds.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from .protocols import DATASET_NAMES, METRIC_KEYS, PaperProtocol

TABLES_DIR = Path(__file__).parent / "tables"
AFCLIP_LOGS_VS_TABLE_1 = "afclip_repo_vs_paper_table1.csv"
DEFAULT_TOLERANCE_POINTS = 1.0  # one point of AUROC (or of the other metric) where the paper prints no std


@dataclass(frozen=True)
class PaperCell:
    """One published value: the row as shipped, and where it is printed."""

    table: str
    method: str
    dataset: str
    category: str  # a category, "mean" (over categories) or "all" (a dataset without categories)
    setting: str
    metric: str
    value: str
    std: str
    unit: str
    source: str  # "file:line"

    @property
    def shots(self) -> int:
        """The shot count of `setting` ("2-shot" -> 2, "zero-shot" -> 0, "1-shot (...)" -> 1)."""
        if self.setting.startswith("zero-shot"):
            return 0
        match = re.match(r"(\d+)-shot", self.setting)
        if match is None:
            raise ValueError(f"{self.source}: setting {self.setting!r} names no shot count.")
        return int(match.group(1))

    @property
    def scale(self) -> float:
        """The factor to percentage points: 100 for fractions, 1 for percentages."""
        return 100.0 if self.unit.startswith("fraction") else 1.0

    @property
    def points(self) -> float:
        return float(self.value) * self.scale

    @property
    def tolerance_points(self) -> float:
        """The paper's std where it prints one, else one point."""
        return float(self.std) * self.scale if self.std else DEFAULT_TOLERANCE_POINTS

    @property
    def benchmark(self) -> str:
        return DATASET_NAMES[self.dataset]

    @property
    def metric_key(self) -> str:
        return METRIC_KEYS[self.metric]


def read_cells(path: Path) -> list[PaperCell]:
    """The rows of one shipped table file."""
    with open(path, newline="") as file:
        return [
            PaperCell(
                row["table"],
                row["method"],
                row["dataset"],
                row["category"],
                row["setting"],
                row["metric"],
                row["value"],
                row["value_std"],
                row["unit"],
                f"{row['source_file']}:{row['source_line']}",
            )
            for row in csv.DictReader(file)
        ]


def paper_cells(paper: PaperProtocol, tables_dir: Path = TABLES_DIR) -> list[PaperCell]:
    """`paper`'s shipped rows."""
    return read_cells(tables_dir / paper.tables_file)


def comparison(cell: PaperCell, ours: float | None) -> dict:
    """The cell's comparison in percentage points: paper, ours (a fraction, as the runner records metrics),
    ours - paper, the tolerance and whether |difference| is within it (None when ours is missing)."""
    ours_points = None if ours is None else 100.0 * ours
    difference = None if ours_points is None else ours_points - cell.points
    return {
        "paper_points": cell.points,
        "ours_points": ours_points,
        "difference_points": difference,
        "tolerance_points": cell.tolerance_points,
        "within_tolerance": None if difference is None else abs(difference) <= cell.tolerance_points + 1e-9,
    }
