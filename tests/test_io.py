"""Atomic writes: a reader sees the old file or folder or the complete new one, never half of a write; and
the file handling of a scoring run (batches, names, masks matched by stem, resuming, joining shares)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_fsad.io import (
    atomic_directory,
    atomic_file,
    atomic_write_text,
    batched,
    join_results,
    masks_by_stem,
    previous_results,
    result_shares,
    unique_name,
)


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_when_the_write_raises(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_file(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_atomic_directory_replaces_a_previous_folder_whole_and_keeps_it_when_the_save_raises(tmp_path):
    folder = tmp_path / "model"
    with atomic_directory(folder) as staging:
        (staging / "config.json").write_text("1")
        (staging / "stale.bin").write_text("x")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_directory(folder) as staging:
        (staging / "config.json").write_text("2")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "stale.bin"]
    assert (folder / "config.json").read_text() == "1"

    with atomic_directory(folder) as staging:
        (staging / "config.json").write_text("3")
    # the new save replaces the folder: nothing of the previous one is left
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    assert (folder / "config.json").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_batched_keeps_order_and_ends_with_the_rest():
    assert list(batched(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 3)) == []


def test_unique_name_numbers_repeated_stems():
    used: set[str] = set()
    assert [unique_name(stem, used) for stem in ("a", "a", "b", "a")] == ["a", "a-2", "b", "a-3"]


def test_masks_are_matched_by_stem_with_or_without_mask_suffix():
    images = [Path("x/001.png"), Path("x/000.png")]
    masks = [Path("m/000_mask.png"), Path("m/001.png")]
    assert masks_by_stem(images, masks, "--images", "--masks") == [Path("m/001.png"), Path("m/000_mask.png")]
    with pytest.raises(ValueError, match=r"--masks has no mask for x/001.png"):
        masks_by_stem(images, masks[:1], "--images", "--masks")
    with pytest.raises(ValueError, match=r"--masks m/000_mask.png and m/000.png both match the image stem"):
        masks_by_stem(images[1:], [masks[0], Path("m/000.png")], "--images", "--masks")


def test_previous_results_are_read_and_shares_joined_after_them_in_rank_order(tmp_path):
    output = tmp_path / "scores.jsonl"
    assert previous_results(output) == []
    earlier = [{"path": "a.png", "score": 1.0}]
    atomic_write_text(output, json.dumps(earlier[0]) + "\n")
    assert previous_results(output) == earlier
    shares = result_shares(output, 2)
    assert [share.name for share in shares] == ["scores.jsonl.part0.tmp", "scores.jsonl.part1.tmp"]
    shares[0].write_text('{"path": "b.png"}\n')
    shares[1].write_text('{"path": "c.png"}\n')
    assert join_results(output, earlier, shares) == '{"path": "b.png"}\n{"path": "c.png"}\n'
    assert [record["path"] for record in previous_results(output)] == ["a.png", "b.png", "c.png"]
    output.write_text("not json\n")
    with pytest.raises(ValueError, match="is not a results file of hf-fsad score \\(line 1\\)"):
        previous_results(output)
