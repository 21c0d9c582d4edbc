"""`make test-floor`: at the declared dependency floors (`.venv-floor`), hf_fsad imports and `hf-fsad score`
scores an image with a tiny random WinCLIP, so the floors in pyproject.toml stay true.

Exits non-zero when an installed core dependency is not at its declared floor (the environment would not
test what it claims) or when anything fails.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from floor_requirements import floor_pins, python_floor
from packaging.version import Version


def check_installed_floors() -> None:
    """Every core dependency installed at exactly its floor; the interpreter named if newer than the floor."""
    wrong = []
    for pin in floor_pins():
        name, version = pin.split("==")
        installed = metadata.version(name)
        if Version(installed) != Version(version):
            wrong.append(f"{name} {installed} (floor {version})")
        print(f"{name}=={installed}")
    if wrong:
        sys.exit("not at the declared floors: " + ", ".join(wrong))
    interpreter = ".".join(map(str, sys.version_info[:2]))
    if Version(interpreter) != Version(python_floor()):
        print(f"note: Python {interpreter}, newer than the floor {python_floor()} (FLOOR_PYTHON=python3.11)")


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null: at transformers 5.4, saving the byte-level tokenizer prints every
    id its vocabulary leaves unused (about 300 kB) from native code, past Python's logging."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def score_one_image(directory: Path) -> dict:
    """`hf-fsad score` of one toy query against two toy references, on a saved tiny random CLIP."""
    from hf_fsad.cli import main
    from hf_fsad.data.toy import toy_records
    from hf_fsad.testing import save_random_clip, tiny_clip_config

    with native_stderr_silenced():
        clip = save_random_clip(tiny_clip_config(), directory / "clip")
    splits = toy_records("weave", num_train=2, num_test_good=0, num_test_anomalous=1, seed=0)
    references = directory / "good"
    references.mkdir()
    for index, record in enumerate(splits["train"]):
        record.image.save(references / f"{index}.png")
    query = directory / "query.png"
    splits["test"][0].image.save(query)
    output = directory / "results.jsonl"
    arguments = ["score", str(query), "--model", f"winclip@{clip}", "--reference", str(references)]
    status = main([*arguments, "--class-name", "fabric", "--device", "cpu", "--output", str(output)])
    if status != 0:
        sys.exit(f"hf-fsad score exited with {status}")
    (record,) = [json.loads(line) for line in output.read_text().splitlines()]
    return record


def main() -> None:
    check_installed_floors()
    with tempfile.TemporaryDirectory() as directory:
        record = score_one_image(Path(directory))
    if not math.isfinite(record["score"]) or record["label"] not in ("normal", "anomalous"):
        sys.exit(f"unexpected record: {record}")
    print(f"floor environment scores an image: {record['score']:.4f} ({record['label']})")


if __name__ == "__main__":
    main()
