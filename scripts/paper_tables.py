"""Copy the rows `hf-fsad reproduce` compares with from the extracted paper tables into the package
(src/hf_fsad/reproduction/tables/), unchanged and with their source columns (`source_file`, `source_line`):
each reproduced table's rows for the methods it runs (the paper's method in its default configuration and
WinCLIP/WinCLIP+), in the metrics the runner computes; and the AF-CLIP repo-log vs Table 1 comparison whole.

    python scripts/paper_tables.py PAPER_TABLES_DIR   # e.g. ../shared/paper_tables
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

from hf_fsad.reproduction.protocols import METRIC_KEYS, PAPERS
from hf_fsad.reproduction.tables import AFCLIP_LOGS_VS_TABLE_1, TABLES_DIR

SOURCES = {
    "metacan": "tables_MetaCAN.csv",
    "anomalous_memory": "tables_AnomalousSamplesFSAD.csv",
    "one_to_normal": "tables_One-to-Normal.csv",
    "vtfusion": "tables_VTFusion.csv",
    "afclip": "tables_AF-CLIP.csv",
}


def selected(row: dict, tables: dict[str, set[str]]) -> bool:
    """Whether `row` is one of the reproduced cells: its table is reproduced, its method is run, it is the
    default configuration (empty `variant`) and its metric is computed."""
    return (
        row["table"] in tables
        and row["method"] in tables[row["table"]]
        and (row["is_own_method"] != "true" or row["variant"] == "")
        and row["metric"] in METRIC_KEYS
    )


def copy_tables(source: Path, target: Path = TABLES_DIR) -> dict[str, int]:
    """Write each paper's selected rows to `target`; the number of rows per file."""
    counts = {}
    for name, paper in PAPERS.items():
        tables = {
            row_table: {method for run in table.runs for method in run.methods}
            for table in paper.tables
            for row_table in table.row_table_names
        }
        with open(source / SOURCES[name], newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if selected(row, tables)]
            columns = reader.fieldnames
        with open(target / paper.tables_file, "w", newline="") as file:
            writer = csv.DictWriter(file, columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        counts[paper.tables_file] = len(rows)
    shutil.copyfile(source / AFCLIP_LOGS_VS_TABLE_1, target / AFCLIP_LOGS_VS_TABLE_1)
    return counts


if __name__ == "__main__":
    for file, count in copy_tables(Path(sys.argv[1])).items():
        print(f"{file}: {count} rows")
