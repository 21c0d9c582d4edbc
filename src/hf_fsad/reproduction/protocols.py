"""Each reproduced table's protocol, encoded once: what the paper states, else the official code's choice, else
ours, each setting labelled with where it comes from (`Setting.source`). Pure Python (no torch), so
`hf-fsad reproduce --list` and scripts/faithfulness_tables.py read it without loading a model.

Sources: the papers' text (../shared/paper_tables/README.md quotes each statement) and the official code where
it was read (MetaCAN's training recipe, AF-CLIP's `test.sh` and `main.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

PAPER, OFFICIAL_CODE, OURS = "paper", "official code", "ours"

# The paper's dataset label (the `dataset` column of the shipped tables) -> its `load_benchmark` name. Names not
# in hf_fsad.data.BENCHMARKS at run time are reported as "needs dataset loader NAME".
DATASET_NAMES = {
    "MVTec AD": "mvtec_ad",
    "MVTec AD (inferred)": "mvtec_ad",
    "VisA": "visa",
    "ELPV": "elpv",
    "HeadCT": "headct",
    "BrainMRI": "brainmri",
    "MNIST": "mnist",
    "CIFAR-10": "cifar10",
    "AITEX": "aitex",
    "SDD": "sdd",
    "KSDD": "ksdd",
    "AFID": "afid",
    "OCT2017": "oct2017",
    "RESC": "resc",
    "BTAD": "btad",
    "DAGM": "dagm",
    "DTD-Synthetic": "dtd_synthetic",
    "Br35H": "br35h",
    "ISIC": "isic",
    "CVC-ClinicDB": "clinicdb",
    "CVC-ColonDB": "colondb",
    "Kvasir": "kvasir",
    "APPD (Automotive Plastic Parts, introduced by the paper)": "appd",
}

# The tables' metric names -> the runner's metric keys (hf_fsad.metrics IMAGE_METRICS / PIXEL_METRICS).
METRIC_KEYS = {
    "image AUROC": "image_auroc",
    "image AUPRC": "image_auprc",
    "image AP": "image_auprc",
    "image F1-max": "image_f1_max",
    "pixel AUROC": "pixel_auroc",
    "pixel AP": "pixel_auprc",
    "pixel F1-max": "pixel_f1_max",
    "PRO/AUPRO": "pixel_aupro",
    "PRO": "pixel_aupro",
}

VIT_B16_PLUS = "ViT-B/16+ (OpenCLIP, LAION-400M)"
CONVERT_B16_PLUS = "hf-fsad convert --open-clip ViT-B-16-plus-240 --pretrained laion400m_e31 DIR"


@dataclass(frozen=True)
class Setting:
    """One protocol setting: its value, where it comes from (paper, official code or ours) and why."""

    value: object
    source: str
    note: str = ""

    def __post_init__(self):
        if self.source not in (PAPER, OFFICIAL_CODE, OURS):
            raise ValueError(
                f"Setting source must be {PAPER!r}, {OFFICIAL_CODE!r} or {OURS!r}, not {self.source!r}."
            )


@dataclass(frozen=True)
class MethodRun:
    """How one method of a table runs: the registry method, the table's names for it (`methods`: the `method`
    column, e.g. AF-CLIP for k = 0 and AF-CLIP+ for k > 0), its model config fields and its training (recipe
    methods: `TrainingArguments`; methods fitted per category: `fit` arguments), each a `Setting`."""

    method: str
    methods: tuple[str, ...]
    model: dict[str, Setting] = field(default_factory=dict)
    training: dict[str, Setting] = field(default_factory=dict)
    splits: tuple[str, ...] = ()  # the auxiliary dataset's splits it trains on (recipe methods)
    # > 0: the table's shot count s is s anomalous references and no normal one (the anomalous-memory method)
    anomalous: int = 0

    def cell_shots(self, shots: int) -> tuple[int, int]:
        """(normal, anomalous) references of this method's cell for the table's `shots`."""
        return (0, shots) if self.anomalous else (shots, 0)


@dataclass(frozen=True)
class TableProtocol:
    """One table: the datasets it reports (paper label -> the dataset its trained model was trained on, None
    when nothing is trained), the settings the output shows, and the methods run."""

    table: str
    title: str
    datasets: dict[str, str | None]
    settings: dict[str, Setting]
    runs: tuple[MethodRun, ...]
    shots: tuple[int, ...]
    num_runs: int
    max_test: int | None = None
    gpu_hours: float = 0.0
    row_tables: tuple[str, ...] = ()  # the `table` values of its rows (default: `table`)

    @property
    def row_table_names(self) -> tuple[str, ...]:
        return self.row_tables or (self.table,)


@dataclass(frozen=True)
class PaperProtocol:
    """A paper: its tables, the shipped table file and the unit its values print in."""

    name: str
    title: str
    tables_file: str
    unit: str  # "fraction" (0-1) or "%"
    tables: tuple[TableProtocol, ...]
    backbone: Setting
    backbone_source: str  # a Hub id, or how to make the CLIP directory --backbone takes
    trained_method: str | None = (
        None  # the method whose weights `--weights` gives (trained on an auxiliary set)
    )

    def table(self, name: str) -> TableProtocol:
        for table in self.tables:
            if table.table.lower() == name.lower():
                return table
        raise ValueError(
            f"{self.name} has no table {name!r}; its tables: {', '.join(t.table for t in self.tables)}."
        )


_WINCLIP_PLUS = MethodRun(
    "winclip", ("WinCLIP", "WinCLIP+"), {"window_scales": Setting([2, 3], OURS, "WinCLIP's")}
)

_METACAN_TRAINING = {
    "recipe": Setting(
        "official",
        OFFICIAL_CODE,
        "MetaCanTrainingArguments(recipe='official'): the tables come from the official code (15 outer updates, "
        "fresh Adam each, inner lr 0.01, official focal loss on the last task); the paper's reading differs",
    ),
    "num_shots": Setting(2, PAPER, "'The k-shot of reference samples is set to 2' (training)"),
}
_METACAN = MethodRun(
    "metacan",
    ("MetaCAN",),
    {
        "feature_layers": Setting([1, 7, 12], PAPER, "App. B.1"),
        "image_size": Setting(240, OURS, "not stated; 225 patch tokens of 16 px imply 240"),
        "detector_type": Setting("official", OFFICIAL_CODE),
    },
    _METACAN_TRAINING,
    splits=("train", "test"),
)
_METACAN_SETTINGS = {
    "backbone": Setting(VIT_B16_PLUS, PAPER, "Sec. 4.1"),
    "resolution": Setting(240, OURS, "not stated; 226 tokens (1 + 15x15 of 16 px) imply 240"),
    "layers": Setting([1, 7, 12], PAPER, "App. B.1"),
    "shots": Setting([2, 4, 8], PAPER),
    "runs": Setting(3, PAPER, "Table 2 caption; seeds not stated (ours: 0, 1, 2)"),
    "references": Setting(
        "test set",
        PAPER,
        "line 316: k normal references drawn from the test set; the runner draws them from the train split "
        "(not reproduced: a deviation)",
    ),
    "metrics": Setting(["image AUROC", "image AUPRC"], PAPER, "image level only"),
    "averaging": Setting("mean over categories of the mean over runs", OURS, "not stated"),
    "baselines": Setting("WinCLIP rows copied from InCTRL's paper", PAPER, "Sec. 4.1"),
}
METACAN = PaperProtocol(
    "metacan",
    "MetaCAN: meta-learned contrastive anomaly networks",
    "metacan.csv",
    "fraction",
    (
        TableProtocol(
            "Table 2",
            "trained on MVTec AD, tested on VisA, ELPV, HeadCT, MNIST",
            {"VisA": "mvtec_ad", "ELPV": "mvtec_ad", "HeadCT": "mvtec_ad", "MNIST": "mvtec_ad"},
            _METACAN_SETTINGS | {"training": Setting("MVTec AD (train + test)", PAPER, "App. B.1")},
            (_METACAN, _WINCLIP_PLUS),
            (2, 4, 8),
            3,
            gpu_hours=6.0,
        ),
        TableProtocol(
            "Table 3",
            "trained on VisA, tested on MVTec AD, AITEX",
            {"MVTec AD": "visa", "AITEX": "visa"},
            _METACAN_SETTINGS | {"training": Setting("VisA (train + test)", PAPER, "App. B.1")},
            (_METACAN, _WINCLIP_PLUS),
            (2, 4, 8),
            3,
            gpu_hours=5.0,
        ),
    ),
    Setting(VIT_B16_PLUS, PAPER),
    CONVERT_B16_PLUS,
    trained_method="metacan",
)

ANOMALOUS_MEMORY = PaperProtocol(
    "anomalous_memory",
    "Anomalous samples for few-shot anomaly detection",
    "anomalous_memory.csv",
    "%",
    (
        TableProtocol(
            "Table 1",
            "one anomalous sample (ours) against WinCLIP+ with one normal sample",
            {"VisA": None, "MVTec AD": None, "SDD": None},
            {
                "backbone": Setting(VIT_B16_PLUS, OURS, "not stated; WinCLIP's (the score it builds on)"),
                "resolution": Setting(240, OURS, "not stated; WinCLIP's"),
                "layers": Setting("last block, windows 16/32/48/112 px", PAPER, "scales: lines 61, 71"),
                "shots": Setting("1 anomalous (ours) / 1 normal (WinCLIP+)", PAPER, "Sec. 4.2"),
                "runs": Setting(3, PAPER, "Sec. 4.1; seeds not stated (ours: 0, 1, 2)"),
                "references": Setting(
                    "anomalous sample from the test images, up to 100 test samples per run", PAPER, "Sec. 4.1"
                ),
                "metrics": Setting(["image AUROC"], PAPER, "not printed; inferred from Sec. 3/4.1"),
                "averaging": Setting("mean over categories of the mean over runs", OURS, "not stated"),
                "training": Setting("none (training-free)", PAPER),
            },
            (
                MethodRun(
                    "anomalous_memory",
                    ("Ours (WinCLIP+ score + anomalous memory bank)",),
                    {
                        "window_scales": Setting(
                            [2, 3, 7], OURS, "16/32/48 px windows at patch 16 (112 px: 7 patches)"
                        )
                    },
                    anomalous=1,
                ),
                _WINCLIP_PLUS,
            ),
            (1,),
            3,
            max_test=100,
            gpu_hours=1.0,
        ),
    ),
    Setting(VIT_B16_PLUS, OURS),
    CONVERT_B16_PLUS,
)

_ONE_TO_NORMAL = MethodRun(
    "one_to_normal",
    ("One-to-Normal",),
    {
        "image_size": Setting(240, PAPER, "'the inference resolution is 240 x 240' (read as CLIP's)"),
        "diffusion_resolution": Setting(
            512, OURS, "not stated: Stable Diffusion v1.5's native resolution (240 may be CLIP's only)"
        ),
        "pool_size": Setting(30, PAPER, "'The image-level memory bank is set to 30'"),
        "text_temperature": Setting(1.0, PAPER, "Eq. 6 has no scale (hf_fsad's default multiplies by 100)"),
    },
    {
        "full_finetune": Setting(True, PAPER, "DreamBooth, 'all model parameters' (ours defaults to LoRA)"),
    },
)
_ONE_TO_NORMAL_SETTINGS = {
    "backbone": Setting("ViT-L/14 (OpenAI) + Stable Diffusion v1.5", PAPER, "Sec. 4.1"),
    "resolution": Setting(240, PAPER, "Sec. 4.1"),
    "layers": Setting(
        "n blocks", PAPER, "n and the layer indices are not given (ours: the method's default)"
    ),
    "shots": Setting([2, 4, 8], PAPER),
    "runs": Setting(5, PAPER, "Tables 1-3 captions; seeds not stated (ours: 0-4)"),
    "references": Setting("k normal train images + generated normals", PAPER, "line 54, 90"),
    "metrics": Setting(["image AUROC", "image AUPRC"], PAPER),
    "averaging": Setting("mean over categories of the mean over runs", OURS, "not stated"),
    "training": Setting(
        "per category on the k normals; auxiliary MVTec AD (VisA for MVTec AD)",
        PAPER,
        "line 112; hf_fsad's One-to-Normal has no auxiliary-trained part, so the auxiliary data is not used",
    ),
}


def _one_to_normal_table(table: str, title: str, datasets: tuple[str, ...], hours: float) -> TableProtocol:
    return TableProtocol(
        table,
        title,
        dict.fromkeys(datasets),
        _ONE_TO_NORMAL_SETTINGS,
        (_ONE_TO_NORMAL, _WINCLIP_PLUS),
        (2, 4, 8),
        5,
        gpu_hours=hours,
    )


ONE_TO_NORMAL = PaperProtocol(
    "one_to_normal",
    "One-to-Normal: anomaly personalization",
    "one_to_normal.csv",
    "%",
    (
        _one_to_normal_table("Table 1", "industrial", ("MVTec AD", "VisA", "KSDD", "AFID", "ELPV"), 400.0),
        _one_to_normal_table("Table 2", "medical", ("OCT2017", "BrainMRI", "HeadCT", "RESC"), 60.0),
        _one_to_normal_table("Table 3", "semantic (one class vs the rest)", ("MNIST", "CIFAR-10"), 60.0),
    ),
    Setting("ViT-L/14 (OpenAI)", PAPER),
    "openai/clip-vit-large-patch14",
)

_VTFUSION_SETTINGS = {
    "backbone": Setting(VIT_B16_PLUS, PAPER, "Sec. IV-A"),
    "resolution": Setting(240, OURS, "not stated; the backbone's"),
    "layers": Setting([3, 6, 9, 12], OURS, "not stated"),
    "shots": Setting([2, 4, 8], PAPER),
    "runs": Setting(3, OURS, "not stated; no std printed"),
    "references": Setting("the k normal train images (+ synthetic anomalies)", PAPER, "line 102, Sec. III-B"),
    "metrics": Setting(["image AUROC", "pixel AUROC"], PAPER),
    "averaging": Setting("mean over categories of the mean over runs", OURS, "not stated"),
    "training": Setting("per category on the k normals", PAPER, "line 179"),
}
_VTFUSION = MethodRun(
    "vtfusion",
    ("VTFusion",),
    {
        "feature_layers": Setting([3, 6, 9, 12], OURS, "not stated"),
        "image_size": Setting(240, OURS, "not stated"),
        "margin": Setting(0.1, OURS, "Eq. 4's (r + alpha); see docs/faithfulness.md on its scale"),
        "distance": Setting(
            "squared_euclidean",
            OURS,
            "D's form is not stated; docs/faithfulness.md measures both on the toy data",
        ),
    },
    {"steps": Setting(1000, OURS, "not stated")},
)
VTFUSION = PaperProtocol(
    "vtfusion",
    "VTFusion: vision-text multimodal fusion",
    "vtfusion.csv",
    "%",
    (
        TableProtocol(
            "Table I",
            "MVTec AD and VisA",
            {"MVTec AD": None, "VisA": None},
            _VTFUSION_SETTINGS,
            (_VTFUSION, _WINCLIP_PLUS),
            (2, 4, 8),
            3,
            gpu_hours=50.0,
        ),
        TableProtocol(
            "Table IV",
            "APPD (PRO)",
            {"APPD (Automotive Plastic Parts, introduced by the paper)": None},
            _VTFUSION_SETTINGS | {"metrics": Setting(["PRO"], PAPER), "shots": Setting([2, 4, 8, 10], PAPER)},
            (_VTFUSION,),
            (2, 4, 8, 10),
            3,
            gpu_hours=5.0,
        ),
    ),
    Setting(VIT_B16_PLUS, PAPER),
    CONVERT_B16_PLUS,
)

_AFCLIP = MethodRun(
    "afclip",
    ("AF-CLIP", "AF-CLIP+"),
    {
        "image_size": Setting(518, PAPER, "'All Images are resized to 518'"),
        "feature_layers": Setting(
            [6, 12, 18, 24], OFFICIAL_CODE, "four blocks (paper); indices: --feature_layers"
        ),
    },
    {
        "batch_size": Setting(8, PAPER),
        "learning_rate": Setting(1e-4, PAPER),
        "epochs": Setting(2, PAPER, "max_steps = 2 epochs of the auxiliary set at batch 8"),
    },
    splits=("test",),
)
_AFCLIP_SETTINGS = {
    "backbone": Setting("ViT-L/14@336px (OpenAI)", PAPER, "Sec. 5.1"),
    "resolution": Setting(518, PAPER, "Sec. 5.1"),
    "layers": Setting([6, 12, 18, 24], OFFICIAL_CODE, "paper: four hierarchical blocks"),
    "metrics": Setting(["image AUROC", "image AP", "pixel AUROC", "PRO/AUPRO"], PAPER),
    "averaging": Setting("mean over categories", PAPER, "line 121"),
    "training": Setting("MVTec AD test split, 2 epochs; VisA for MVTec AD", PAPER, "Sec. 5.1"),
}
_AFCLIP_TRAINED_ON = {
    label: "mvtec_ad"
    for label in (
        "VisA",
        "BTAD",
        "DAGM",
        "DTD-Synthetic",
        "BrainMRI",
        "Br35H",
        "ISIC",
        "CVC-ClinicDB",
        "CVC-ColonDB",
        "Kvasir",
    )
} | {"MVTec AD": "visa"}
AFCLIP = PaperProtocol(
    "afclip",
    "AF-CLIP: zero-shot anomaly detection via anomaly-focused CLIP adaptation",
    "afclip.csv",
    "%",
    (
        TableProtocol(
            "Table 1",
            "zero-shot, trained on MVTec AD (VisA for MVTec AD)",
            {"MVTec AD": "visa"} | _AFCLIP_TRAINED_ON,
            _AFCLIP_SETTINGS
            | {
                "shots": Setting([0], PAPER),
                "runs": Setting(1, OURS, "zero-shot: deterministic"),
                "references": Setting("none", PAPER),
            },
            (_AFCLIP, _WINCLIP_PLUS),
            (0,),
            1,
            gpu_hours=8.0,
        ),
        TableProtocol(
            "Table 2",
            "few-shot AF-CLIP+ on MVTec AD and VisA",
            {"MVTec AD": "visa", "VisA": "mvtec_ad"},
            _AFCLIP_SETTINGS
            | {
                "shots": Setting([0, 1, 2, 4], PAPER),
                "runs": Setting(5, OFFICIAL_CODE, "test.sh: 5 repetitions, --seed -1 (ours: seeds 0-4)"),
                "references": Setting("k normal images from the train split", OFFICIAL_CODE, "test.sh"),
            },
            (_AFCLIP, _WINCLIP_PLUS),
            (0, 1, 2, 4),
            5,
            gpu_hours=6.0,
        ),
        TableProtocol(
            "logs",
            "the authors' per-category logs of their released weights (zero-shot)",
            {"MVTec AD": "visa"} | _AFCLIP_TRAINED_ON,
            _AFCLIP_SETTINGS
            | {
                "shots": Setting([0], OFFICIAL_CODE),
                "runs": Setting(1, OFFICIAL_CODE),
                "references": Setting("none", OFFICIAL_CODE),
                "metrics": Setting(
                    [
                        "image AUROC",
                        "image AP",
                        "image F1-max",
                        "pixel AUROC",
                        "pixel AP",
                        "pixel F1-max",
                        "PRO/AUPRO",
                    ],
                    OFFICIAL_CODE,
                ),
            },
            (dataclasses.replace(_AFCLIP, methods=("AF-CLIP",)),),
            (0,),
            1,
            gpu_hours=2.0,
            row_tables=(
                "official repo: weight/train_on_mvtec_test_res.txt",
                "official repo: weight/train_on_visa_test_res.txt",
            ),
        ),
    ),
    Setting("ViT-L/14@336px (OpenAI)", PAPER),
    "openai/clip-vit-large-patch14-336",
    trained_method="afclip",
)

PAPERS: dict[str, PaperProtocol] = {
    paper.name: paper for paper in (METACAN, ANOMALOUS_MEMORY, ONE_TO_NORMAL, VTFUSION, AFCLIP)
}


def paper_protocol(name: str) -> PaperProtocol:
    """The protocol of paper `name`; a ValueError lists the papers."""
    if name not in PAPERS:
        raise ValueError(f"Unknown paper {name!r}; available: {', '.join(PAPERS)}.")
    return PAPERS[name]
