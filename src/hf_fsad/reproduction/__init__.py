"""`hf-fsad reproduce`: each paper's tables run with the paper's protocol, the published values beside ours
(`protocols`: the protocols; `tables`: the shipped published cells; `harness`: the runs and the comparison)."""

from .protocols import PAPERS, MethodRun, PaperProtocol, Setting, TableProtocol, paper_protocol
from .tables import PaperCell, comparison, paper_cells

__all__ = [
    "PAPERS",
    "MethodRun",
    "PaperCell",
    "PaperProtocol",
    "Setting",
    "TableProtocol",
    "comparison",
    "paper_cells",
    "paper_protocol",
]
