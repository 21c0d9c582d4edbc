"""What a benchmark run is made of: the datasets it runs (`DatasetSpec`) and its cells (`Cell`), each with the
id results.json keeps it under."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..tiling import Tiling


@dataclass
class DatasetSpec:
    """A benchmark to run: `load_benchmark(name, root, category, **options)` for each category."""

    name: str
    root: str | None = None
    categories: list[str] | None = None  # None: every category the data holds
    options: dict = field(default_factory=dict)

    @classmethod
    def from_entry(cls, entry: str | dict) -> DatasetSpec:
        """A config entry: the CLI's text form, or a dict of the fields (name, root, categories, options)."""
        return cls(**entry) if isinstance(entry, dict) else cls.parse(entry)

    @classmethod
    def parse(cls, text: str) -> DatasetSpec:
        """`name`, `name:root` or `name:root:category` (the CLI's form)."""
        name, _, rest = text.partition(":")
        root, _, category = rest.partition(":")
        return cls(name, root or None, [category] if category else None)


def cell_id(cell: dict) -> str:
    """The id of a cell in results.json (cells saved before anomalous shots were recorded had 0); a tiled
    cell's id ends with its tiling."""
    keys = ("method", "dataset", "category", "k", "seed")
    parts = [*(str(cell[key]) for key in keys), str(cell.get("anomalous", 0))]
    if cell.get("tiling"):
        parts.append(json.dumps(cell["tiling"], sort_keys=True))
    return "|".join(parts)


@dataclass(frozen=True)
class Cell:
    """One run of the benchmark: `method` on `category` of `dataset`, with k normal and `anomalous` anomalous
    references drawn with `seed`; with a `tiling`, scored tiled."""

    method: str
    dataset: str
    category: str
    k: int
    seed: int
    anomalous: int
    tiling: Tiling | None = None

    @property
    def record(self) -> dict:
        """The cell's fields as results.json records them; `tiling` only for tiled cells, so an untiled cell's
        record and id are those of cells saved before tiling."""
        record = dataclasses.asdict(self)
        if self.tiling is None:
            del record["tiling"]
        return record

    @property
    def id(self) -> str:
        return cell_id(self.record)
