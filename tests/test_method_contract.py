"""The contract every registered method keeps (`FsadPreTrainedModel`), checked on a tiny random model of each:
it scores, its bank survives a file round trip, it calibrates and its decisions follow the stored thresholds,
a saved model loads back bit for bit through `AutoModel`, bad pixels and images of another size are refused
by name, and the base class's contract methods are real.

Each method's tiny model is its tester's (`<Model>Tester` in tests/test_<model_type>.py, tests/model_tester.py);
method test files keep only what is specific to their method.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel

from hf_fsad.bank import ReferenceBank
from hf_fsad.calibration import MEDIAN_NORMAL_LEVEL, MIN_RELATIVE_SCALE
from hf_fsad.modeling_base import FsadPreTrainedModel
from hf_fsad.registry import METHODS, MethodSpec, method_spec
from hf_fsad.testing import tiny_clip_config
from model_tester import method_tester

SIZE = 240  # tiny_clip_config's image size


def images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def tiny_model(model_type: str, request: pytest.FixtureRequest) -> FsadPreTrainedModel:
    """The tiny random model of `model_type`'s tester (config fields its `config_fixtures` name taken from
    `request`), fitted (2 steps, the tester's `fit_arguments`) when the method fits per category."""
    tester = method_tester(model_type)
    fixtures = {field: request.getfixturevalue(name) for field, name in tester.config_fixtures.items()}
    model = tester.tiny_model(**fixtures)
    if model.fits_per_category:
        rng = np.random.default_rng(3)
        normals = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(2)]
        model.fit(normals, class_name="grid", steps=2, seed=0, **tester.fit_arguments)
        model.eval()
    return model


def bank_of(model: FsadPreTrainedModel) -> ReferenceBank:
    """A 2-shot bank (or the fitted one), with an anomalous reference where the method needs one."""
    if model.saves_its_references:  # its bank holds what `fit` learnt and takes no reference images
        return model.build_reference_bank()
    anomalous = {"anomalous_pixel_values": images(1, 2)} if model.needs_anomalous_references else {}
    with torch.no_grad():
        return model.build_reference_bank(images(2, 1), **anomalous)


@pytest.fixture(params=sorted(METHODS))
def model(request) -> FsadPreTrainedModel:
    return tiny_model(request.param, request)


@pytest.mark.parametrize("model_type", sorted(METHODS))
def test_every_method_declares_its_model_tester(model_type):
    assert method_tester(model_type).model_type == model_type


def test_a_method_without_a_tester_is_named(monkeypatch):
    untested = MethodSpec(model_type="untested", config_name="UntestedConfig", model_name="UntestedModel")
    monkeypatch.setitem(METHODS, "untested", untested)
    with pytest.raises(
        LookupError, match=r"untested has no tests/test_untested.py declaring its UntestedModelTester"
    ):
        method_tester("untested")
    renamed = MethodSpec(model_type="winclip", config_name="WinClipConfig", model_name="RenamedModel")
    monkeypatch.setitem(METHODS, "winclip", renamed)
    with pytest.raises(LookupError, match=r"tests/test_winclip.py declares no RenamedModelTester"):
        method_tester("winclip")


def test_scores_are_finite_and_shaped_and_forward_is_encode_then_score(model):
    bank, queries = bank_of(model), images(2, 4)
    with torch.no_grad():
        output = model(queries, reference_bank=bank)
        split = model.score_features(model.encode_images(queries), bank)
    assert output.image_scores.shape == (2,) and torch.isfinite(output.image_scores).all()
    assert output.anomaly_maps is None or output.anomaly_maps.shape == (2, SIZE, SIZE)
    assert torch.equal(output.image_scores, split.image_scores)
    assert not torch.equal(output.image_scores[0], output.image_scores[1])  # two random images differ


def test_bank_round_trip_reproduces_scores(model, tmp_path):
    bank, queries = bank_of(model), images(2, 4)
    bank.save(tmp_path / "bank.safetensors")
    loaded = ReferenceBank.load(tmp_path / "bank.safetensors")
    assert (loaded.model_type, loaded.config_hash, loaded.k) == (bank.model_type, bank.config_hash, bank.k)
    with torch.no_grad():
        assert torch.equal(
            model(queries, reference_bank=loaded).image_scores,
            model(queries, reference_bank=bank).image_scores,
        )


def test_every_method_calibrates_and_its_decisions_survive_the_bank_file(model, tmp_path):
    """Leave-one-out on the bank's 2 references (held-out normals where it is refused: a model fitted on its
    normals), then the labels, normalised scores and masks of the reloaded bank follow the stored thresholds."""
    bank, queries = bank_of(model), images(2, 4)
    anomalous = {"anomalous_pixel_values": images(1, 2)} if model.needs_anomalous_references else {}
    normals = (
        {"normal_pixel_values": images(3, 5)}
        if model.leave_one_out_refusal(2) is not None
        else {"reference_pixel_values": images(2, 1), "bank_inputs": anomalous}
    )
    with pytest.warns(UserWarning, match="normal scores cannot guarantee"):  # 2 or 3 normals: too few for 5 %
        calibrated = model.calibrate(bank, **normals)
    calibrated.save(tmp_path / "bank.safetensors")
    rule = ReferenceBank.load(tmp_path / "bank.safetensors").calibration
    assert rule == calibrated.calibration
    with torch.no_grad():
        output = model(queries, reference_bank=ReferenceBank.load(tmp_path / "bank.safetensors"))
    assert torch.equal(output.labels, (output.image_scores.double() > rule.image_threshold).long())
    distance = (output.image_scores.double() - rule.image_threshold) / rule.image_scale
    normalized = 0.5 + distance / (2 * (1 + distance.abs()))  # hf_fsad.calibration's module docstring
    torch.testing.assert_close(output.normalized_scores, normalized.float(), rtol=0, atol=6e-8)  # f64 -> f32
    if output.anomaly_maps is not None:
        assert torch.equal(output.anomaly_masks, output.anomaly_maps.double() > rule.pixel_threshold)


def test_the_calibrated_scale_puts_the_median_held_out_normal_at_a_tenth(model):
    """The normalisation follows its rule on each method's own scores, not only its formula: 3 held-out
    normals are too few for 5 %, so the threshold is their largest score, and their median normalises to
    `MEDIAN_NORMAL_LEVEL` (0.1, at z = -4), unless that takes a scale below `MIN_RELATIVE_SCALE` |threshold|
    (tiny random models score their normals within 1e-3 of each other), which is the scale then."""
    bank, normals = bank_of(model), images(3, 5)
    with pytest.warns(UserWarning, match="normal scores cannot guarantee"):
        rule = model.calibrate(bank, normal_pixel_values=normals).calibration
    with torch.no_grad():
        _, median, largest = model(normals, reference_bank=bank).image_scores.double().sort().values.tolist()
    assert rule.image_threshold == largest  # the same batch as calibrate's: the same float32 scores
    median_distance = 1 / (2 * MEDIAN_NORMAL_LEVEL) - 1  # |z| at which 1/2 + z / (2 (1 + |z|)) is the level
    scale = max((largest - median) / median_distance, MIN_RELATIVE_SCALE * abs(largest))
    distance = (median - largest) / scale
    # float64 arithmetic on the same scores: a few ulp, inside approx's default rel 1e-6
    assert rule.image_scale == pytest.approx(scale)
    assert float(rule.normalize(torch.tensor([median], dtype=torch.float64))) == pytest.approx(
        0.5 + distance / (2 * (1 + abs(distance)))
    )


def test_save_and_auto_load_is_exact(model, tmp_path):
    bank, queries = bank_of(model), images(2, 4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert (
        type(loaded) is type(model) and loaded.config_hash() == model.config_hash()
    )  # config + trained weights
    assert not any(parameter.requires_grad for parameter in loaded.backbone.clip.parameters())
    with torch.no_grad():
        expected = model(queries, reference_bank=bank)
        actual = loaded(queries, reference_bank=ReferenceBank.load(_saved(bank, tmp_path)))
    assert torch.equal(actual.image_scores, expected.image_scores)  # same weights, same kernels: bit for bit
    if expected.anomaly_maps is not None:
        assert torch.equal(actual.anomaly_maps, expected.anomaly_maps)
    for name, scores in (expected.branch_scores or {}).items():
        assert torch.equal(actual.branch_scores[name], scores), name


def _saved(bank: ReferenceBank, folder) -> str:
    path = folder / "bank.safetensors"
    bank.save(path)
    return str(path)


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (torch.randn(1, 1, SIZE, SIZE), r"3 \(RGB\) channels"),
        (torch.full((1, 3, SIZE, SIZE), float("nan")), "contains NaN values"),
        (torch.full((1, 3, SIZE, SIZE), float("inf")), "contains infinite values"),
        (torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), "floating-point"),
        (torch.randn(3, SIZE, SIZE), r"shape \(B, 3, H, W\)"),
        (torch.randn(1, 3, 224, 224), f"224x224 images, but this model takes {SIZE}x{SIZE}"),
    ],
    ids=["one-channel", "nan", "inf", "uint8", "no-batch", "another-size"],
)
def test_bad_pixels_and_another_size_are_refused_by_name(model, pixels, message):
    bank = bank_of(model)
    with pytest.raises(ValueError, match=message):
        model(pixels, reference_bank=bank)


def test_a_bank_of_another_method_is_refused(model):
    bank = bank_of(model)
    foreign = ReferenceBank("another_method", bank.config_hash, bank.class_name, bank.k, bank.tensors)
    with pytest.raises(ValueError, match="built by a 'another_method' model"):
        model(images(1, 4), reference_bank=foreign)


def test_a_bank_of_weights_since_changed_in_place_is_refused():
    """`config_hash` is memoised per weight version: a weight updated in place (as an optimizer step does)
    refuses the banks built before; so does a write through `weight.data`, which the version counter does not
    see, once `invalidate_feature_key` is called."""
    model = method_tester("winclip").tiny_model()
    projection = model.backbone.clip.visual_projection.weight

    def step_in_place():
        projection.add_(1.0)

    def write_through_data():
        projection.data.copy_(projection.detach() - 1.0)
        model.invalidate_feature_key()

    for change_weight in (step_in_place, write_through_data):
        bank = bank_of(model)
        model(images(1, 4), reference_bank=bank)  # the bank fits (and its hash is memoised)
        with torch.no_grad():
            change_weight()
        with pytest.raises(ValueError, match="another config or backbone"):
            model(images(1, 4), reference_bank=bank)


def test_the_base_class_declares_the_contract():
    class Bare(FsadPreTrainedModel):
        pass

    bare = Bare(method_spec("winclip").config(clip_config=tiny_clip_config()))
    assert Bare.fits_per_category is False
    for call, name in [
        (lambda: bare.encode_images(images(1, 0)), "encode_images"),
        (lambda: bare.score_features({}), "score_features"),
        (lambda: bare.build_reference_bank(), "build_reference_bank"),
    ]:
        with pytest.raises(NotImplementedError, match=f"Bare does not implement {name}"):
            call()
    with pytest.raises(NotImplementedError, match="Bare is not fitted per category"):
        bare.fit([], class_name="grid")
    assert Bare.validates_weights is False and Bare.saves_its_references is False
    assert Bare.export_refusal is None
    for call in (lambda: bare.validation_set([], []), lambda: bare.validate_weights(None, images(1, 0), [0])):
        with pytest.raises(NotImplementedError, match="Bare has no weights to validate"):
            call()


def test_each_flag_matches_what_the_method_implements(model):
    """A method that says it fits per category or validates weights implements that step; one that does not
    inherits the base class's refusal (callers read the flags and never probe for methods)."""
    cls = type(model)
    assert model.fits_per_category == (cls.fit is not FsadPreTrainedModel.fit)
    assert model.validates_weights == (cls.validate_weights is not FsadPreTrainedModel.validate_weights)
    assert model.validates_weights == (cls.validation_views is not FsadPreTrainedModel.validation_views)
    assert model.validates_weights == bool(model.validated_tensors)
