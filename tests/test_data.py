"""Benchmark builders on tiny folders in each dataset's published layout; Hub layout; k-shot manifests."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
from PIL import Image

from extras import import_extra
from hf_fsad.data import (
    FEATURES,
    BenchmarkLayoutError,
    ReferenceManifest,
    class_name_for,
    load_benchmark,
    sample_references,
    write_hub_layout,
)


def save_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def noise(seed, shape=(16, 16, 3)):
    return np.random.default_rng(seed).integers(0, 256, size=shape)


def box_mask(shape, box, value=255):
    mask = np.zeros(shape, np.uint8)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = value
    return mask


def mask_array(mask):
    return None if mask is None else np.asarray(mask)


# --- MVTec AD ---------------------------------------------------------------------------------------------


@pytest.fixture
def mvtec_root(tmp_path):
    for category in ("bottle", "screw"):
        base = tmp_path / category
        for index in range(3):
            save_image(base / "train" / "good" / f"{index:03d}.png", noise(index))
        save_image(base / "test" / "good" / "000.png", noise(10))
        for index in range(2):
            save_image(base / "test" / "broken" / f"{index:03d}.png", noise(20 + index))
            save_image(
                base / "ground_truth" / "broken" / f"{index:03d}_mask.png",
                box_mask((16, 16), (2, 6, 3 + index, 9)),
            )
    (tmp_path / "license.txt").write_text("not a category")
    return tmp_path


def test_mvtec_ad_counts_labels_and_masks(mvtec_root):
    dataset = load_benchmark("mvtec_ad", root=mvtec_root, category="bottle")
    train, test = dataset["train"], dataset["test"]
    assert train.features == FEATURES
    assert train.num_rows == 3 and set(train["label"]) == {0}
    assert test["label"] == [1, 1, 0]
    assert test["defect_type"] == ["broken", "broken", "good"]
    assert test["path"][0] == "bottle/test/broken/000.png"
    first = test[0]
    np.testing.assert_array_equal(np.asarray(first["image"]), noise(20))
    np.testing.assert_array_equal(mask_array(first["mask"]), box_mask((16, 16), (2, 6, 3, 9)))
    assert test[2]["mask"] is None


def test_mvtec_ad_all_categories(mvtec_root):
    dataset = load_benchmark("mvtec_ad", root=mvtec_root)
    assert sorted(set(dataset["test"]["category"])) == ["bottle", "screw"]
    assert dataset["train"].num_rows == 6


def test_mvtec_ad_missing_mask_names_the_file(mvtec_root):
    (mvtec_root / "bottle" / "ground_truth" / "broken" / "001_mask.png").unlink()
    with pytest.raises(BenchmarkLayoutError, match=r"broken/001_mask\.png.*Expected layout"):
        load_benchmark("mvtec_ad", root=mvtec_root, category="bottle")


def test_mvtec_ad_mask_of_another_size_is_refused(mvtec_root):
    save_image(mvtec_root / "bottle" / "ground_truth" / "broken" / "000_mask.png", np.zeros((8, 8)))
    with pytest.raises(BenchmarkLayoutError, match="masks must align"):
        load_benchmark("mvtec_ad", root=mvtec_root, category="bottle")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda root: shutil.rmtree(root / "bottle" / "train" / "good"), r"train/good"),
        (lambda root: None, "Category 'cable' is not in"),
    ],
    ids=["no-train-folder", "unknown-category"],
)
def test_mvtec_ad_malformed(mvtec_root, change, message):
    change(mvtec_root)
    category = "cable" if "cable" in message else "bottle"
    with pytest.raises(BenchmarkLayoutError, match=message):
        load_benchmark("mvtec_ad", root=mvtec_root, category=category)


def test_missing_root_and_unknown_benchmark(tmp_path):
    with pytest.raises(BenchmarkLayoutError, match="does not exist"):
        load_benchmark("mvtec_ad", root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs root="):
        load_benchmark("visa")
    with pytest.raises(ValueError, match="Unknown benchmark 'mvtec'"):
        load_benchmark("mvtec")


def test_each_dataset_declares_its_prompt_class_word():
    assert class_name_for("elpv", "mono") == "solar cell"
    assert class_name_for("sdd", "ksdd") == "metal surface"
    assert class_name_for("mvtec_ad", "metal_nut") == "metal nut"  # none declared: the category's name
    assert class_name_for("not_a_benchmark", "metal_nut") == "metal nut"


def test_names_of_the_old_benchmarks_module_warn_and_are_the_moved_ones():
    from hf_fsad.data import elpv

    with pytest.warns(DeprecationWarning, match=r"use `hf_fsad\.data\.elpv\.build_elpv`"):
        from hf_fsad.data.benchmarks import build_elpv
    assert build_elpv is elpv.build_elpv
    with pytest.raises(ImportError):
        from hf_fsad.data.benchmarks import build_nothing  # noqa: F401


# --- VisA ------------------------------------------------------------------------------------------------


def test_visa_follows_the_split_csv(tmp_path):
    rows = ["object,split,label,image,mask"]
    for index in range(3):
        image = f"candle/Data/Images/Normal/{index:04d}.JPG"
        save_image(tmp_path / image, noise(index))
        rows.append(f"candle,{'train' if index < 2 else 'test'},normal,{image},")
    image, mask = "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"
    save_image(tmp_path / image, noise(9))
    save_image(tmp_path / mask, box_mask((16, 16), (0, 4, 0, 4), value=1))  # VisA-style 0/1 mask
    rows.append(f"candle,test,anomaly,{image},{mask}")
    save_image(tmp_path / "split_csv" / "placeholder.png", noise(0)).unlink()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")

    dataset = load_benchmark("visa", root=tmp_path, category="candle")
    assert dataset["train"].num_rows == 2
    assert dataset["test"]["label"] == [0, 1]
    np.testing.assert_array_equal(mask_array(dataset["test"][1]["mask"]), box_mask((16, 16), (0, 4, 0, 4)))

    (tmp_path / "split_csv" / "1cls.csv").write_text("object,image\ncandle,x.JPG\n")
    with pytest.raises(BenchmarkLayoutError, match="lacks the columns"):
        load_benchmark("visa", root=tmp_path)


# --- ELPV ------------------------------------------------------------------------------------------------


@pytest.fixture
def elpv_root(tmp_path):
    lines = []
    probabilities = [0.0] * 8 + [1.0] * 3 + [0.3333333333333333, 0.6666666666666666]
    for index, probability in enumerate(probabilities):
        for kind in ("mono", "poly"):
            name = f"images/{kind}{index:04d}.png"
            save_image(tmp_path / name, noise(index, (12, 12)))
            lines.append(f"{name}  {probability}  {kind}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_elpv_labels_split_and_uncertain_cells(elpv_root):
    dataset = load_benchmark("elpv", root=elpv_root, category="mono")
    assert dataset["train"].num_rows == 6  # 75 % of 8 normal cells
    test = dataset["test"]
    assert test["label"].count(0) == 2 and test["label"].count(1) == 3
    assert not {"images/mono0011.png", "images/mono0012.png"} & (
        set(test["path"]) | set(dataset["train"]["path"])
    )
    again = load_benchmark("elpv", root=elpv_root, category="mono")
    other = load_benchmark("elpv", root=elpv_root, category="mono", seed=1)
    assert again["train"]["path"] == dataset["train"]["path"]
    assert set(other["train"]["path"]) != set(dataset["train"]["path"])


def test_elpv_both_types_and_malformed_labels(elpv_root):
    assert sorted(set(load_benchmark("elpv", root=elpv_root)["test"]["category"])) == ["mono", "poly"]
    (elpv_root / "labels.csv").write_text("images/mono0000.png 0.0\n")
    with pytest.raises(BenchmarkLayoutError, match="line 1"):
        load_benchmark("elpv", root=elpv_root)


def test_elpv_from_the_installed_package():
    import_extra("elpv_dataset", "elpv")
    dataset = load_benchmark("elpv")
    assert dataset["train"].num_rows + dataset["test"].num_rows == 1508 + 715  # probability 0 and 1 cells


# --- HeadCT / BrainMRI -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["headct", "brainmri"])
def test_normal_abnormal_folders(tmp_path, name):
    for index in range(8):
        save_image(tmp_path / "normal" / f"{index}.png", noise(index, (10, 10)))
    for index in range(3):
        save_image(tmp_path / "abnormal" / f"{index}.jpg", noise(50 + index, (10, 10)))
    dataset = load_benchmark(name, root=tmp_path)
    assert dataset["train"].num_rows == 6
    assert dataset["test"]["label"] == [0, 0, 1, 1, 1]
    assert set(dataset["test"]["category"]) == {name}
    shutil.rmtree(tmp_path / "abnormal")
    with pytest.raises(BenchmarkLayoutError, match="abnormal"):
        load_benchmark(name, root=tmp_path)


# --- AITEX -----------------------------------------------------------------------------------------------


def test_aitex_tiles(tmp_path):
    save_image(tmp_path / "NODefect_images" / "2311694-2040n7u" / "0001_000_00.png", noise(1, (256, 1024)))
    defect = noise(2, (256, 512))
    save_image(tmp_path / "Defect_images" / "0002_019_00.png", defect)
    save_image(tmp_path / "Mask_images" / "0002_019_00_mask.png", box_mask((256, 512), (100, 120, 300, 340)))
    dataset = load_benchmark("aitex", root=tmp_path)
    assert dataset["train"].num_rows == 3  # 75 % of the 4 defect-free tiles
    test = dataset["test"]
    assert sorted(zip(test["path"], test["label"]))[:2] == [
        ("Defect_images/0002_019_00.png#tile00", 0),
        ("Defect_images/0002_019_00.png#tile01", 1),
    ]
    anomalous = test[test["label"].index(1)]
    np.testing.assert_array_equal(np.asarray(anomalous["image"]), defect[:, 256:512])
    np.testing.assert_array_equal(mask_array(anomalous["mask"]), box_mask((256, 256), (100, 120, 44, 84)))
    assert set(test["category"]) == {"fabric00"} and anomalous["defect_type"] == "defect019"

    save_image(tmp_path / "Defect_images" / "0003_002_00.png", noise(3, (256, 300)))
    with pytest.raises(BenchmarkLayoutError, match="not a multiple of 256"):
        load_benchmark("aitex", root=tmp_path)


# --- KolektorSDD -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ksdd", "sdd"])
def test_ksdd_thirds(tmp_path, name):
    for part in range(3):
        save_image(tmp_path / "kos01" / f"Part{part}.jpg", np.full((30, 10), 100 + part))
        mask = box_mask((30, 10), (12, 15, 2, 5)) if part == 0 else np.zeros((30, 10))
        save_image(tmp_path / "kos01" / f"Part{part}_label.bmp", mask)
    dataset = load_benchmark(name, root=tmp_path)
    test = dataset["test"]
    assert dataset["train"].num_rows + test.num_rows == 9
    assert test["label"].count(1) == 1
    anomalous = test[test["label"].index(1)]
    assert anomalous["path"] == "kos01/Part0.jpg#third1"
    assert np.asarray(anomalous["image"]).shape == (10, 10)
    np.testing.assert_array_equal(mask_array(anomalous["mask"]), box_mask((10, 10), (2, 5, 2, 5)))


# --- MNIST, digits, CIFAR-10 -----------------------------------------------------------------------------


def write_idx(path, array, compress=False):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def test_mnist_even_normal_odd_anomalous(tmp_path):
    digits = np.arange(10)
    images = np.stack([np.full((28, 28), 10 * d) for d in digits])
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", digits, compress=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:4])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", digits[:4])
    dataset = load_benchmark("mnist", root=tmp_path)
    assert dataset["train"].num_rows == 5
    assert [np.asarray(image)[0, 0] for image in dataset["train"]["image"]] == [0, 20, 40, 60, 80]
    assert dataset["test"]["label"] == [0, 1, 0, 1]
    assert dataset["test"]["defect_type"] == ["good", "digit_1", "good", "digit_3"]
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09\x01")
    with pytest.raises(BenchmarkLayoutError, match="header says"):
        load_benchmark("mnist", root=tmp_path)


def test_sklearn_digits_stand_in():
    dataset = load_benchmark("sklearn_digits")
    total = dataset["train"].num_rows + dataset["test"].num_rows
    assert total == 1797
    assert set(dataset["train"]["label"]) == {0}
    odd = [int(t.split("_")[1]) for t in dataset["test"]["defect_type"] if t != "good"]
    assert odd and all(d % 2 == 1 for d in odd)
    assert np.asarray(dataset["train"][0]["image"]).max() > 16  # scaled from 0..16 to 0..255


def test_cifar10_one_vs_all(tmp_path):
    def batch(labels, seed):
        pixels = noise(seed, (len(labels), 3072))
        return np.concatenate([np.asarray(labels)[:, None], pixels], axis=1).astype(np.uint8), pixels

    for index in range(1, 6):
        batch([0, 1, index % 10], index)[0].tofile(tmp_path / f"data_batch_{index}.bin")
    rows, pixels = batch([0, 3, 0, 9], 99)
    rows.tofile(tmp_path / "test_batch.bin")
    dataset = load_benchmark("cifar10", root=tmp_path, category="airplane")
    assert dataset["train"].num_rows == 5 + 0  # label 0 once per batch (index % 10 is never 0 here)
    assert dataset["test"]["label"] == [0, 1, 0, 1]
    assert dataset["test"]["defect_type"] == ["good", "cat", "good", "truck"]
    expected = pixels[1].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(np.asarray(dataset["test"][1]["image"]), expected)
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(BenchmarkLayoutError, match="not a CIFAR-10 binary batch"):
        load_benchmark("cifar10", root=tmp_path, category="airplane")


def test_toy_all_categories():
    dataset = load_benchmark("toy", num_train=1, num_test_good=1, num_test_anomalous=1, image_size=32)
    assert sorted(set(dataset["test"]["category"])) == ["grid", "stripes", "weave"]


# --- Your own folder ------------------------------------------------------------------------------------


def make_folder_root(root, categories=("bracket",)):
    """ROOT/<category>/: good/ (8 normals), scratch/ (2 images, masked: one mask named <stem>.png, one
    <stem>_mask.png with VisA-style 0/1 values), dent/ (1 image, no masks)."""
    for category in categories:
        base = root / category
        for index in range(8):
            save_image(base / "good" / f"{index:03d}.png", noise(index))
        for index in range(2):
            save_image(base / "scratch" / f"s{index}.png", noise(30 + index))
        save_image(base / "masks" / "scratch" / "s0.png", box_mask((16, 16), (2, 6, 3, 9)))
        save_image(base / "masks" / "scratch" / "s1_mask.png", box_mask((16, 16), (8, 12, 0, 4), value=1))
        save_image(base / "dent" / "d0.png", noise(40))
    return root


@pytest.fixture
def folder_root(tmp_path):
    return make_folder_root(tmp_path)


def test_folder_split_labels_and_masks(folder_root):
    dataset = load_benchmark("folder", root=folder_root)
    train, test = dataset["train"], dataset["test"]
    assert train.features == FEATURES
    assert train.num_rows == 6 and set(train["label"]) == {0}  # round(0.75 x 8) normals
    assert test["label"] == [0, 0, 1, 1, 1]
    assert test["defect_type"] == ["good", "good", "dent", "scratch", "scratch"]
    assert set(train["category"]) == set(test["category"]) == {"bracket"}
    normals = set(train["path"]) | set(test["path"][:2])
    assert normals == {f"bracket/good/{index:03d}.png" for index in range(8)}
    assert test["path"][2:] == ["bracket/dent/d0.png", "bracket/scratch/s0.png", "bracket/scratch/s1.png"]
    np.testing.assert_array_equal(np.asarray(test[3]["image"]), noise(30))
    np.testing.assert_array_equal(mask_array(test[3]["mask"]), box_mask((16, 16), (2, 6, 3, 9)))
    np.testing.assert_array_equal(mask_array(test[4]["mask"]), box_mask((16, 16), (8, 12, 0, 4)))
    assert test["mask"][:3] == [None, None, None]  # normals, and dent/ without a masks/dent/ folder


def test_folder_split_is_seeded_and_a_category_folder_is_a_root(folder_root):
    first = load_benchmark("folder", root=folder_root)["train"]["path"]
    assert load_benchmark("folder", root=folder_root, seed=0)["train"]["path"] == first
    assert set(load_benchmark("folder", root=folder_root, seed=1)["train"]["path"]) != set(first)
    assert load_benchmark("folder", root=folder_root, train_fraction=0.5)["train"].num_rows == 4
    alone = load_benchmark("folder", root=folder_root / "bracket", category="bracket")
    assert alone["train"]["path"] == [path.removeprefix("bracket/") for path in first]
    assert set(alone["test"]["category"]) == {"bracket"}


def test_folder_reads_every_image_suffix_score_reads(folder_root):
    from hf_fsad.deploy.image_files import IMAGE_SUFFIXES as RUNNER_SUFFIXES
    from hf_fsad.io import IMAGE_SUFFIXES

    assert set(RUNNER_SUFFIXES) == set(IMAGE_SUFFIXES)  # the exported runner reads the same files
    Image.fromarray(noise(50).astype(np.uint8)).save(
        folder_root / "bracket" / "dent" / "d1.webp", lossless=True
    )
    test = load_benchmark("folder", root=folder_root)["test"]
    assert "bracket/dent/d1.webp" in test["path"]
    np.testing.assert_array_equal(
        np.asarray(test[test["path"].index("bracket/dent/d1.webp")]["image"]), noise(50)
    )


def test_folder_several_categories(tmp_path):
    dataset = load_benchmark("folder", root=make_folder_root(tmp_path, ("bracket", "plate")))
    assert sorted(set(dataset["test"]["category"])) == ["bracket", "plate"]
    assert dataset["train"].num_rows == 12
    assert load_benchmark("folder", root=tmp_path, category="plate")["test"].num_rows == 5
    with pytest.raises(BenchmarkLayoutError, match="Category 'gear' is not in"):
        load_benchmark("folder", root=tmp_path, category="gear")


def remove_normals(base, keep):
    for file in sorted((base / "good").iterdir())[keep:]:
        file.unlink()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda base: shutil.rmtree(base / "good"), r"folder \S*bracket/good, but it does not exist"),
        (lambda base: remove_normals(base, 0), r"folder \S*bracket/good holds no images"),
        (lambda base: remove_normals(base, 1), r"bracket/good holds 1 normal image\(s\): too few to split"),
        (
            lambda base: save_image(base / "masks" / "scratch" / "s7.png", np.zeros((16, 16))),
            r"mask \S*masks/scratch/s7\.png has no image in \S*bracket/scratch",
        ),
        (
            lambda base: (base / "masks" / "scratch" / "s1_mask.png").unlink(),
            r"No mask for \S*bracket/scratch/s1\.png: expected \S*masks/scratch/s1\.png or s1_mask\.png",
        ),
        (
            lambda base: save_image(base / "masks" / "scratch" / "s0_mask.png", np.zeros((16, 16))),
            r"scratch/s0\.png has several masks",
        ),
        (
            lambda base: save_image(base / "masks" / "crack" / "c0.png", np.zeros((16, 16))),
            r"masks/crack matches no defect folder",
        ),
        (
            lambda base: [shutil.rmtree(base / name) for name in ("dent", "scratch", "masks")],
            r"bracket has no defect folder",
        ),
        (lambda base: (base / "dent" / "d0.png").unlink(), r"folder \S*bracket/dent holds no images"),
    ],
    ids=[
        "no-good-folder",
        "no-normals",
        "too-few-normals",
        "mask-without-image",
        "missing-mask",
        "two-masks",
        "masks-of-no-defect",
        "no-defects",
        "empty-defect-folder",
    ],
)
def test_folder_malformed(folder_root, change, message):
    change(folder_root / "bracket")
    with pytest.raises(BenchmarkLayoutError, match=message):
        load_benchmark("folder", root=folder_root)


def test_folder_train_fraction_must_leave_both_splits(folder_root):
    with pytest.raises(ValueError, match="strictly between 0 and 1, got 1.0"):
        load_benchmark("folder", root=folder_root, train_fraction=1.0)


def test_folder_unreadable_image_is_skipped_with_a_warning(folder_root, caplog):
    (folder_root / "bracket" / "dent" / "d0.png").write_bytes(b"not a png")
    test = load_benchmark("folder", root=folder_root)["test"]
    assert test["defect_type"] == ["good", "good", "scratch", "scratch"]
    assert "skipped bracket/dent/d0.png" in caplog.text


def test_a_file_edited_in_place_is_read_again_not_served_from_the_cache(folder_root):
    mask = folder_root / "bracket" / "masks" / "scratch" / "s0.png"
    assert mask_array(load_benchmark("folder", root=folder_root)["test"][3]["mask"]).sum() == 255 * 24
    save_image(mask, np.full((16, 16), 255))  # same path, new content
    assert mask_array(load_benchmark("folder", root=folder_root)["test"][3]["mask"]).sum() == 255 * 256


# --- Hub layout ------------------------------------------------------------------------------------------


def test_hub_layout_round_trip_is_self_contained(mvtec_root, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    original = {
        category: load_benchmark("mvtec_ad", root=mvtec_root, category=category)
        for category in ("bottle", "screw")
    }
    for category, dataset in original.items():
        write_hub_layout(dataset, repo, category, benchmark="mvtec_ad")
    expected = [
        (row["path"], np.asarray(row["image"]), mask_array(row["mask"])) for row in original["screw"]["test"]
    ]
    shutil.rmtree(mvtec_root)  # the repo must not point at the source files

    loaded = load_benchmark("mvtec_ad", root=repo, category="screw")
    assert loaded["test"].features == FEATURES
    for (path, image, mask), row in zip(expected, loaded["test"]):
        assert row["path"] == path
        np.testing.assert_array_equal(np.asarray(row["image"]), image)
        if mask is None:
            assert row["mask"] is None
        else:
            np.testing.assert_array_equal(mask_array(row["mask"]), mask)
    assert loaded["train"].info.dataset_name == "mvtec_ad"
    assert load_benchmark("mvtec_ad", root=repo)["train"].num_rows == 6
    with pytest.raises(ValueError, match="no category 'cable'"):
        load_benchmark("mvtec_ad", root=repo, category="cable")
    with pytest.raises(ValueError, match="holds benchmark 'mvtec_ad', not 'visa'"):
        write_hub_layout(original["bottle"], repo, "bottle", benchmark="visa")


# --- k-shot manifests ------------------------------------------------------------------------------------


def test_reference_sampling_is_seeded_and_manifests_replay(mvtec_root, tmp_path):
    train = load_benchmark("mvtec_ad", root=mvtec_root)["train"]
    first = sample_references(train, k=2, seed=0, category="bottle")
    assert first == sample_references(train.shuffle(seed=5), k=2, seed=0, category="bottle")
    draws = {
        tuple(sample_references(train, k=2, seed=seed, category="bottle").image_ids) for seed in range(6)
    }
    assert len(draws) > 1
    assert all(image_id.startswith("bottle/train/good/") for image_id in first.image_ids)

    first.save(tmp_path / "manifest.json")
    replay = ReferenceManifest.load(tmp_path / "manifest.json")
    assert replay == first and replay.dataset == "mvtec_ad"
    assert replay.select(train)["path"] == first.image_ids


def test_reference_sampling_errors(mvtec_root, tmp_path):
    train = load_benchmark("mvtec_ad", root=mvtec_root)["train"]
    with pytest.raises(ValueError, match="pass category="):
        sample_references(train, k=1, seed=0)
    with pytest.raises(ValueError, match=r"k=4 references \(\+0 for validation\): category .bottle. has 3"):
        sample_references(train, k=4, seed=0, category="bottle")
    manifest = ReferenceManifest("mvtec_ad", "bottle", 1, 0, ["bottle/train/good/999.png"])
    with pytest.raises(ValueError, match="not in the split"):
        manifest.select(train)
    (tmp_path / "bad.json").write_text('{"k": 1}')
    with pytest.raises(ValueError, match="not a reference manifest"):
        ReferenceManifest.load(tmp_path / "bad.json")


def test_anomalous_protocol_sampling(mvtec_root):
    data = load_benchmark("mvtec_ad", root=mvtec_root, category="bottle")
    manifest = sample_references(
        data["train"], k=1, seed=0, test=data["test"], num_anomalous=1, num_validation=1, max_test=2
    )
    assert len(manifest.anomalous_ids) == 1 and manifest.anomalous_ids[0].startswith("bottle/test/broken/")
    assert len(manifest.validation_ids) == 1 and manifest.validation_ids[0] not in manifest.image_ids
    assert len(manifest.test_ids) == 2 and manifest.anomalous_ids[0] not in manifest.test_ids
    for k in (0, 2):  # the test side does not depend on k
        other = sample_references(data["train"], k=k, seed=0, test=data["test"], num_anomalous=1, max_test=2)
        assert (other.anomalous_ids, other.test_ids) == (manifest.anomalous_ids, manifest.test_ids)
    with pytest.raises(ValueError, match="pass test="):
        sample_references(data["train"], k=1, seed=0, num_anomalous=1)
    with pytest.raises(ValueError, match="Cannot draw 3 anomalous references"):
        sample_references(data["train"], k=1, seed=0, test=data["test"], num_anomalous=3)
