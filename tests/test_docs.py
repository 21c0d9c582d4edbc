"""The docs hold: tests they name as evidence exist (docs/faithfulness.md), and their examples run."""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `tests/test_x.py::test_name`, and `::test_other` in the same cell meaning the same file.
REFERENCE = re.compile(r"(tests/[\w/]+\.py)?::(\w+)")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_test_named_in_the_faithfulness_tables_exists():
    missing, checked = [], 0
    for line in (ROOT / "docs" / "faithfulness.md").read_text(encoding="utf-8").splitlines():
        for cell in line.split("|"):
            current = None
            for file, name in REFERENCE.findall(cell):
                current = file or current
                assert current, f"`::{name}` without a file before it in: {cell.strip()}"
                checked += 1
                if name not in _test_names(ROOT / current):
                    missing.append(f"{current}::{name}")
    assert checked > 50 and not missing, missing


def test_the_first_calibration_snippet_runs_and_decides(tmp_path, monkeypatch):
    """docs/calibration.md's Python example, executed as written (it builds its own tiny random model)."""
    text = (ROOT / "docs" / "calibration.md").read_text(encoding="utf-8")
    snippet = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "docs/calibration.md", "exec"), namespace)  # noqa: S102 - the repository's own docs
    output, bank = namespace["output"], namespace["bank"]
    assert (tmp_path / "tile_bank.safetensors").is_file()
    assert (
        output.labels.tolist()
        == (output.image_scores.double() > bank.calibration.image_threshold).long().tolist()
    )


def test_the_own_data_snippets_run_on_a_generated_folder(tiny_clip_dir, tmp_path, monkeypatch):
    """docs/own_data.md's Python and command-line examples, on a generated parts/ folder, with a tiny random
    CLIP in place of the Hub checkpoint they name (no network in tests)."""
    import json
    import shlex

    from hf_fsad.cli import main
    from hf_fsad.data import load_benchmark
    from test_data import make_folder_root

    text = (ROOT / "docs" / "own_data.md").read_text(encoding="utf-8")
    snippets = re.findall(r"```(python|bash)\n(.*?)```", text, re.DOTALL)
    assert [kind for kind, _ in snippets] == ["python", "bash", "python"]
    monkeypatch.chdir(tmp_path)
    make_folder_root(tmp_path / "parts", ("bracket", "plate"))
    for kind, snippet in snippets:
        snippet = snippet.replace("openai/clip-vit-base-patch16", tiny_clip_dir)
        if kind == "python":
            exec(compile(snippet, "docs/own_data.md", "exec"), {})  # noqa: S102 - the repository's own docs
        else:
            command = shlex.split(snippet.replace("\\\n", " "))
            assert command[:2] == ["hf-fsad", "benchmark"] and main(command[1:]) == 0
    for out, split in (("parts", {}), ("parts-half", {"train_fraction": 0.5, "seed": 1})):
        cells = json.loads((tmp_path / "runs" / out / "results.json").read_text())["cells"]
        # 2 categories x k in (2, 4) x 3 seeds, none failed
        assert len(cells) == 12 and not any("error" in cell for cell in cells)
        train = set(load_benchmark("folder", root="parts", category="bracket", **split)["train"]["path"])
        references = {i for c in cells if c["category"] == "bracket" for i in c["reference_ids"]}
        assert references <= train and len(train) == (6 if out == "parts" else 4)


# --- Every snippet of the README and docs/ runs -------------------------------------------------------------

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A fenced block, possibly indented (inside a list item): its language, the rest of the fence line, its body.
FENCE = re.compile(r"^([ \t]*)```(\w*)([^\n]*)\n(.*?)^\1```[ \t]*$", re.DOTALL | re.MULTILINE)
NO_RUN = "no-run:"


def _blocks(path: Path, languages: set[str]) -> list[tuple[int, str, str]]:
    """(line, fence info after the language, dedented body) of each block of `languages` in `path`."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        indent, language, info, body = match.groups()
        if language in languages:
            lines = [line.removeprefix(indent) for line in body.splitlines()]
            blocks.append((text.count("\n", 0, match.start()) + 1, info.strip(), "\n".join(lines) + "\n"))
    return blocks


def _documented_workspace(directory: Path) -> None:
    """What the snippets assume a reader has on disk, built from tiny random models and toy images: the
    CLIP checkpoints they name (a local folder at a Hub id's path is what `from_pretrained` loads first),
    the converted `clip-vit-b-16-plus-240`, the trained models the training section writes, Stable
    Diffusion's folder, normal images in `good/`, queries in `queries/`, an annotated `defect.png`, a
    `parts/` folder of two categories in the own-data layout, and the README's Python quick start's saved
    model `winclip-bottle` and calibrated bank `bottle.safetensors` (pages beyond the README start there)."""
    import numpy as np
    from PIL import Image

    from hf_fsad import AfClipModel, MetaCanModel, WinClipModel
    from hf_fsad.data import load_benchmark
    from hf_fsad.testing import save_random_clip, save_tiny_diffusion_pipeline, tiny_clip_config

    for name in (
        "openai/clip-vit-base-patch16",
        "openai/clip-vit-large-patch14",
        "openai/clip-vit-large-patch14-336",
        "clip-vit-b-16-plus-240",
    ):
        save_random_clip(tiny_clip_config(), directory / name)
    clip = str(directory / "clip-vit-b-16-plus-240")
    MetaCanModel.from_clip(clip, feature_layers=[1, 2]).save_pretrained(directory / "runs/metacan-mvtec")
    AfClipModel.from_clip(clip, feature_layers=[1, 2]).save_pretrained(directory / "runs/afclip-mvtec")
    save_tiny_diffusion_pipeline(directory / "stable-diffusion-v1-5/stable-diffusion-v1-5")

    data = load_benchmark("toy", category="weave", num_train=4, num_test_good=2, num_test_anomalous=2)
    for folder in ("good", "queries"):
        (directory / folder).mkdir()
    for index, image in enumerate(data["train"]["image"]):
        image.save(directory / f"good/good{index}.png")
    for index, image in enumerate(data["test"]["image"]):
        image.save(directory / f"queries/part{index}.png")
    anomalous = data["test"].filter(lambda row: row["label"] == 1)[0]
    anomalous["image"].save(directory / "defect.png")
    mask = np.array(anomalous["mask"].convert("L")) > 0
    Image.fromarray((mask * 255).astype(np.uint8)).save(directory / "defect_mask.png")

    winclip = WinClipModel.from_clip(str(directory / "openai/clip-vit-base-patch16"))
    references = winclip.image_processor()(list(data["train"]["image"]), return_tensors="pt").pixel_values
    bank = winclip.calibrate(winclip.build_reference_bank(references, class_name="bottle"), references)
    bank.save(directory / "bottle.safetensors")
    winclip.save_pretrained(directory / "winclip-bottle")

    # Your own part in the generic folder layout (docs/own_data.md): good/, a defect type, its masks.
    for category, texture in (("bracket", "grid"), ("plate", "stripes")):
        part = load_benchmark("toy", category=texture, num_train=8, num_test_good=0, num_test_anomalous=2)
        folder = directory / "parts" / category
        for name in ("good", "scratch", "masks/scratch"):
            (folder / name).mkdir(parents=True)
        for index, image in enumerate(part["train"]["image"]):
            image.save(folder / f"good/{index:03d}.png")
        for index, row in enumerate(part["test"]):
            row["image"].save(folder / f"scratch/{index:03d}.png")
            row["mask"].convert("L").save(folder / f"masks/scratch/{index:03d}.png")


@pytest.fixture(scope="module")
def documented_workspace(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("docs_workspace")
    _documented_workspace(directory)
    return directory


@pytest.fixture
def quick_fits(monkeypatch):
    """Fitting snippets run with a few updates and the tiny diffusion model's small settings, so the suite
    stays fast: the code path is the documented one, only the step counts and sizes shrink."""
    from functools import partialmethod

    from hf_fsad import OneToNormalModel, VtFusionModel

    monkeypatch.setattr(VtFusionModel, "fit", partialmethod(VtFusionModel.fit, steps=2))
    monkeypatch.setattr(
        OneToNormalModel,
        "fit",
        partialmethod(OneToNormalModel.fit, steps=2, num_class_images=1, class_image_steps=2),
    )
    from_clip = OneToNormalModel.from_clip.__func__
    monkeypatch.setattr(
        OneToNormalModel,
        "from_clip",
        classmethod(
            lambda cls, clip, **config: from_clip(
                cls, clip, **{"diffusion_resolution": 32, "num_inference_steps": 10, "pool_size": 3} | config
            )
        ),
    )


def test_the_block_extraction_finds_the_docs_snippets():
    """Guards the runner below: a fence pattern that stopped matching would let every page pass empty. The
    README has the Python quick start and the pipeline; docs/methods.md a block per method but WinCLIP (whose
    block is the README's); the other pages the rest (16 in all when written)."""
    assert len(_blocks(ROOT / "README.md", {"python"})) >= 2
    methods = _blocks(ROOT / "docs" / "methods.md", {"python"})
    assert any("AnomalousMemoryModel.from_clip" in body for _, _, body in methods)
    assert sum(len(_blocks(doc, {"python"})) for doc in DOCS) >= 14
    assert any(
        line for line, _, body in _blocks(ROOT / "docs" / "performance.md", SHELL) if "torchrun" in body
    )


@pytest.fixture
def logging_restored():
    """Logging as it was before the test: a snippet may configure it (docs/development.md sets the `hf_fsad`
    logger to INFO), which would otherwise reach the tests that run after it."""
    root, package = logging.getLogger(), logging.getLogger("hf_fsad")
    handlers, root_level, package_level = list(root.handlers), root.level, package.level
    yield
    for handler in [handler for handler in root.handlers if handler not in handlers]:
        root.removeHandler(handler)
    root.setLevel(root_level)
    package.setLevel(package_level)


@pytest.mark.parametrize(
    "doc",
    [doc for doc in DOCS if _blocks(doc, {"python"})],
    ids=lambda path: path.relative_to(ROOT).as_posix(),
)
def test_every_python_snippet_runs(
    doc, documented_workspace, quick_fits, tmp_path, monkeypatch, logging_restored
):
    """The Python blocks of each page run in order, each in a fresh namespace (so each defines what it
    uses), in one working directory holding what the page assumes on disk; a block may be skipped only with
    a reason on its fence line (```python no-run: why)."""
    import shutil

    blocks = _blocks(doc, {"python"})
    workspace = tmp_path / "workspace"
    shutil.copytree(documented_workspace, workspace)
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for line, info, body in blocks:
        if info.startswith(NO_RUN):
            assert info[len(NO_RUN) :].strip(), f"{doc.name}:{line}: a no-run block must say why"
            continue
        assert not info, f"{doc.name}:{line}: unknown fence info {info!r} (only '{NO_RUN} reason')"
        try:
            exec(compile(body, f"{doc.name}:{line}", "exec"), {"__name__": "__snippet__"})  # noqa: S102
        except Exception as error:
            raise AssertionError(f"the Python block at {doc.name}:{line} fails: {error!r}") from error


SHELL = {"bash", "sh", "shell", "console"}


def _cli_commands(body: str) -> list[str]:
    """The `hf-fsad ...` command lines of a shell block (continuations joined, comments dropped), also when
    run as `python -m hf_fsad.cli` under torchrun or accelerate launch."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith("hf-fsad "):
            commands.append(line.removeprefix("hf-fsad "))
        elif "-m hf_fsad.cli " in line:
            commands.append(line.split("-m hf_fsad.cli ", 1)[1])
    return commands


def test_every_cli_command_in_the_docs_parses():
    """Every `hf-fsad` command in a shell block of the README and docs/ uses a subcommand and flags the
    parser accepts, with valid values: the docs cannot drift from the CLI."""
    import argparse
    import contextlib
    import io
    import shlex

    from hf_fsad.cli import build_parser

    parser = build_parser()
    (subcommands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    failures, checked = [], 0
    for doc in DOCS:
        for line, _, body in _blocks(doc, SHELL):
            for command in _cli_commands(body):
                checked += 1
                words = shlex.split(command)
                where = f"{doc.relative_to(ROOT)}:{line}: hf-fsad {command}"
                if words[0] not in subcommands.choices:
                    failures.append(f"{where}\n    unknown subcommand {words[0]!r}")
                    continue
                known = subcommands.choices[words[0]]._option_string_actions
                unknown = [
                    word for word in words if word.startswith("--") and word.split("=")[0] not in known
                ]
                if unknown:
                    failures.append(f"{where}\n    flags the parser does not have: {unknown}")
                    continue
                stderr = io.StringIO()
                try:
                    with contextlib.redirect_stderr(stderr):
                        parser.parse_args(words)
                except SystemExit:
                    failures.append(f"{where}\n    {stderr.getvalue().strip().splitlines()[-1]}")
    assert checked > 20 and not failures, "\n".join(failures)


# --- Every relative link of the README and docs/ resolves ---------------------------------------------------

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> list[str]:
    """The lines of `path` outside fenced code blocks (where `#` starts a comment, not a heading)."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of `path`: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading suffixed -1, -2, ..."""
    anchors: set[str] = set()
    for line in _prose(path):
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchor, repeat = slug, 0
            while anchor in anchors:
                repeat += 1
                anchor = f"{slug}-{repeat}"
            anchors.add(anchor)
    return anchors


def test_the_anchor_rule_matches_githubs():
    """Guards the link test below on headings whose anchors GitHub is known to give."""
    anchors = _anchors(ROOT / "docs" / "performance.md")
    assert "every-method-hf-fsad-benchmark---profile" in anchors
    assert "exported-runtimes-onnx-runtime-and-openvino" in anchors
    assert "quick-start-passfail-on-your-own-images" in _anchors(ROOT / "README.md")


def test_every_relative_link_in_the_docs_resolves():
    """Every relative link of the README and docs/ names an existing file and, with `#anchor`, a heading of
    it: moving a section cannot leave a link behind."""
    failures, checked = [], 0
    for doc in DOCS:
        for line in _prose(doc):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):  # https:, mailto: ...
                    continue
                checked += 1
                file, _, anchor = target.partition("#")
                path = (doc.parent / file).resolve() if file else doc
                where = f"{doc.relative_to(ROOT)}: ({target})"
                if not path.exists():
                    failures.append(f"{where}: no file {path.relative_to(ROOT)}")
                elif anchor and anchor not in _anchors(path):
                    failures.append(f"{where}: no heading with anchor #{anchor} in {path.relative_to(ROOT)}")
    assert checked > 30 and not failures, "\n".join(failures)
