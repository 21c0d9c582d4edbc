"""The loaders of the datasets the papers' tables use, on tiny folders in each published layout
(tests/dataset_layouts.py writes them): counts, labels, masks, categories, and clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from dataset_layouts import LAYOUT_WRITERS, box_mask, write_image, write_mask
from hf_fsad.data import BENCHMARKS, FEATURES, BenchmarkLayoutError, class_name_for, load_benchmark

# name: (categories written, category loaded, train rows, test labels in order, test defect types in order)
EXPECTED = {
    "mvtec_ad": (("bottle", "cable"), "cable", 3, [1, 1, 0], ["broken", "broken", "good"]),
    "visa": (("candle", "pcb1"), "pcb1", 3, [0, 1, 1], ["good", "anomaly", "anomaly"]),
    "btad": (("01", "02"), "01", 3, [1, 1, 0], ["ko", "ko", "good"]),
    "dtd_synthetic": (("Blotchy_099", "Woven_001"), "Woven_001", 3, [1, 1, 0], ["bad", "bad", "good"]),
    "dagm": (("Class1", "Class2"), "Class2", 3, [0, 0, 1], ["good", "good", "defect"]),
    "oct2017": (("oct2017",), "oct2017", 3, [0, 0, 1, 1, 1], ["good", "good", "cnv", "dme", "drusen"]),
    "resc": (("resc",), "resc", 3, [0, 0, 1, 1], ["good", "good", "edema", "edema"]),
    "afid": (("afid",), "afid", 4, [1, 0, 0], ["defect019", "good", "good"]),
    "br35h": (("br35h",), "br35h", 3, [0, 1, 1], ["good", "abnormal", "abnormal"]),
    "isic": (("isic",), "isic", 0, [1, 1], ["anomaly", "anomaly"]),
    "clinicdb": (("clinicdb",), "clinicdb", 0, [1, 1], ["anomaly", "anomaly"]),
    "colondb": (("colondb",), "colondb", 0, [1, 1], ["anomaly", "anomaly"]),
    "kvasir": (("kvasir",), "kvasir", 0, [1, 1], ["anomaly", "anomaly"]),
}


def written(name, root):
    LAYOUT_WRITERS[name](root, EXPECTED[name][0])
    return root


def mask_array(mask):
    return None if mask is None else np.asarray(mask)


def test_every_writer_is_a_registered_benchmark_with_expectations():
    assert set(LAYOUT_WRITERS) == set(EXPECTED) <= set(BENCHMARKS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_labels_categories_and_masks(name, tmp_path):
    _, category, train_rows, labels, defects = EXPECTED[name]
    dataset = load_benchmark(name, root=written(name, tmp_path), category=category)
    train, test = dataset["train"], dataset["test"]
    assert train.features == test.features == FEATURES
    assert train.num_rows == train_rows and set(train["label"]) <= {0}
    assert test["label"] == labels
    assert test["defect_type"] == defects
    assert set(train["category"]) | set(test["category"]) == {category}
    expected_mask = box_mask((4, 256), (1, 3, 44, 54)) if name == "afid" else box_mask()
    for row in test:
        if row["label"] == 0 or name in ("oct2017", "br35h"):  # image labels only
            assert row["mask"] is None
        else:
            np.testing.assert_array_equal(mask_array(row["mask"]), expected_mask)


@pytest.mark.parametrize("name", ["btad", "dtd_synthetic", "dagm"])
def test_every_category_and_an_unknown_one(name, tmp_path):
    categories = EXPECTED[name][0]
    dataset = load_benchmark(name, root=written(name, tmp_path))
    assert sorted(set(dataset["test"]["category"])) == sorted(categories)
    assert dataset["train"].num_rows == 2 * EXPECTED[name][2]
    with pytest.raises(BenchmarkLayoutError, match=r"Category 'nothing' is not in .*Expected layout"):
        load_benchmark(name, root=tmp_path, category="nothing")


def test_the_datasets_without_normal_images_are_anomalous_only(tmp_path):
    for name in ("isic", "clinicdb", "colondb", "kvasir"):
        dataset = load_benchmark(name, root=written(name, tmp_path / name))
        assert dataset["train"].num_rows == 0
        assert set(dataset["test"]["label"]) == {1}  # image metrics are undefined: pixel metrics only


def test_paths_are_relative_to_the_root(tmp_path):
    test = load_benchmark("btad", root=written("btad", tmp_path), category="01")["test"]
    assert test["path"] == ["01/test/ko/0000.bmp", "01/test/ko/0001.bmp", "01/test/ok/0000.bmp"]
    test = load_benchmark("isic", root=written("isic", tmp_path / "isic"))["test"]
    assert test["path"][0] == "ISBI2016_ISIC_Part1_Test_Data/ISIC_0000000.jpg"


def test_prompt_class_words():
    words = {name: class_name_for(name, EXPECTED[name][1]) for name in EXPECTED}
    assert words == {
        "mvtec_ad": "cable",  # MVTec AD and VisA name the object by its category
        "visa": "pcb1",
        "btad": "industrial product",
        "dtd_synthetic": "texture",
        "dagm": "textured surface",
        "oct2017": "retinal OCT scan",
        "resc": "retinal OCT scan",
        "afid": "fabric",
        "br35h": "brain MRI scan",
        "isic": "skin",
        "clinicdb": "colon",
        "colondb": "colon",
        "kvasir": "colon",
    }


# --- Errors naming the file or folder -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        (
            "btad",
            lambda root: (root / "01" / "ground_truth" / "ko" / "0001.png").unlink(),
            r"No mask for \S*01/test/ko/0001\.bmp: expected \S*ground_truth/ko/0001\.png or \S*/0001\.bmp",
        ),
        (
            "dtd_synthetic",
            lambda root: write_mask(root / "Woven_001" / "ground_truth" / "bad" / "001.png"),
            r"bad/001\.png has several masks",
        ),
        (
            "dagm",
            lambda root: (root / "Class2" / "Test" / "Label" / "0002_label.PNG").unlink(),
            r"Expected the file \S*Class2/Test/Label/0002_label\.PNG",
        ),
        (
            "dagm",
            lambda root: write_image(root / "Class2" / "Test" / "0009.PNG", 0, (16, 16)),
            r"\S*Class2/Test/0009\.PNG is not listed in \S*Label/Labels\.txt",
        ),
        (
            "dagm",
            lambda root: (root / "Class2" / "Train" / "Label" / "Labels.txt").write_text(
                "1\n1\t1\t0001.PNG\n"
            ),
            r"Labels\.txt line 2 is not",
        ),
        (
            "oct2017",
            lambda root: (root / "test" / "UNKNOWN").mkdir(),
            r"has the folder\(s\) UNKNOWN, not a diagnosis of OCT2017",
        ),
        (
            "oct2017",
            lambda root: shutil.rmtree(root / "test" / "DME"),
            r"Expected the folder \S*test/DME, but it does not exist",
        ),
        (
            "resc",
            lambda root: (root / "Test" / "test_label" / "Ungood" / "21_1.png").unlink(),
            r"No mask for \S*Ungood/21_1\.png: expected \S*test_label/Ungood/21_1\.png",
        ),
        (
            "br35h",
            lambda root: shutil.rmtree(root / "yes"),
            r"Expected the folder \S*/yes, but it does not exist. Expected layout: ROOT/no/",
        ),
        (
            "isic",
            lambda root: (
                root / "ISBI2016_ISIC_Part1_Test_GroundTruth" / "ISIC_0000001_Segmentation.png"
            ).unlink(),
            r"expected \S*ISIC_0000001_Segmentation\.png",
        ),
        (
            "kvasir",
            lambda root: write_image(root / "images" / "3.png", 3),
            r"No mask for \S*images/3\.png: expected \S*masks/3\.png or \S*masks/3\.jpg",
        ),
        (
            "afid",
            lambda root: (root / "Mask_images" / "0044_019_04_mask.png").unlink(),
            r"No mask for \S*0044_019_04\.png",
        ),
    ],
    ids=[
        "btad-missing-mask",
        "dtd-two-masks",
        "dagm-listed-label-missing",
        "dagm-unlisted-image",
        "dagm-bad-labels-line",
        "oct2017-unknown-folder",
        "oct2017-missing-diagnosis",
        "resc-missing-mask",
        "br35h-no-yes-folder",
        "isic-missing-mask",
        "kvasir-image-without-mask",
        "afid-missing-mask",
    ],
)
def test_bad_layouts_name_the_file(name, change, message, tmp_path):
    change(written(name, tmp_path))
    with pytest.raises(BenchmarkLayoutError, match=message):
        load_benchmark(name, root=tmp_path)


# --- What each layout allows ------------------------------------------------------------------------------


def test_dagm_without_labels_txt_reads_the_label_files(tmp_path):
    written("dagm", tmp_path)
    with_list = load_benchmark("dagm", root=tmp_path)
    for labels in tmp_path.glob("Class*/*/Label/Labels.txt"):
        labels.unlink()
    without = load_benchmark("dagm", root=tmp_path)
    for split in ("train", "test"):
        assert list(without[split]["path"]) == list(with_list[split]["path"])
        assert list(without[split]["label"]) == list(with_list[split]["label"])
    assert "Class1/Train/0003.PNG" not in without["train"]["path"]  # Train's defective image: in no split


def test_dtd_synthetic_reads_masks_named_after_the_image_too(tmp_path):
    written("dtd_synthetic", tmp_path)
    ground_truth = tmp_path / "Woven_001" / "ground_truth" / "bad"
    (ground_truth / "000_mask.png").rename(ground_truth / "000.png")
    test = load_benchmark("dtd_synthetic", root=tmp_path, category="Woven_001")["test"]
    np.testing.assert_array_equal(mask_array(test[0]["mask"]), box_mask())


def test_polyp_masks_may_be_jpeg_named_after_the_frame(tmp_path):
    written("kvasir", tmp_path)
    (tmp_path / "masks" / "2.png").unlink()
    write_mask(tmp_path / "masks" / "2.jpg", np.zeros((16, 16), np.uint8))
    test = load_benchmark("kvasir", root=tmp_path)["test"]
    assert test["label"] == [1, 1] and mask_array(test[1]["mask"]).max() == 0


def test_br35h_train_fraction_zero_puts_every_scan_in_test(tmp_path):
    dataset = load_benchmark("br35h", root=written("br35h", tmp_path), train_fraction=0.0)
    assert dataset["train"].num_rows == 0
    assert dataset["test"]["label"] == [0, 0, 0, 0, 1, 1]
    assert not any(path.startswith("pred/") for path in dataset["test"]["path"])


def test_afid_pools_the_fabrics_and_leaves_out_the_clean_tiles_of_defect_images(tmp_path):
    written("afid", tmp_path)
    afid = load_benchmark("afid", root=tmp_path)
    aitex = load_benchmark("aitex", root=tmp_path)
    defect_tiles = ["Defect_images/0044_019_04.png#tile00", "Defect_images/0044_019_04.png#tile01"]
    afid_paths = [*afid["train"]["path"], *afid["test"]["path"]]
    aitex_paths = [*aitex["train"]["path"], *aitex["test"]["path"]]
    assert defect_tiles[0] not in afid_paths and defect_tiles[1] in afid_paths
    assert set(defect_tiles) <= set(aitex_paths)
    assert len(afid_paths) == 7 and len(aitex_paths) == 8
    assert set(aitex["test"]["category"]) == {"fabric04", "fabric05"}
