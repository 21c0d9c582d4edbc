"""The names that the split of `modeling_base` (issue 26) moved or renamed still work for one release: the old
import path and the old bank verbs warn with a DeprecationWarning naming the new one and give the same object
or result."""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_fsad import bank, calibration, image_processing, modeling_base, modeling_outputs

MOVED = [
    ("AnomalyDetectionOutput", modeling_outputs),
    ("ReferenceBank", bank),
    ("BANK_FORMAT_VERSION", bank),
    ("apply_calibration", calibration),
    ("validate_pixel_values", image_processing),
]


@pytest.mark.parametrize(("name", "new_module"), MOVED)
def test_a_moved_name_from_modeling_base_warns_with_its_new_path_and_is_the_same_object(name, new_module):
    with pytest.warns(DeprecationWarning, match=rf"use `{new_module.__name__}\.{name}`"):
        old = getattr(modeling_base, name)
    assert old is getattr(new_module, name)


def test_the_old_from_import_statement_still_works_and_warns():
    with pytest.warns(DeprecationWarning, match=r"`hf_fsad\.bank\.ReferenceBank`"):
        from hf_fsad.modeling_base import ReferenceBank
    assert ReferenceBank is bank.ReferenceBank


def test_names_that_stayed_in_modeling_base_do_not_warn_and_unknown_ones_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from hf_fsad.modeling_base import PRECISIONS, TEXT_CACHE_FILE, FsadPreTrainedModel  # noqa: F401
    with pytest.raises(AttributeError, match="has no attribute 'ReferenceBanks'"):
        modeling_base.ReferenceBanks  # noqa: B018


def _fields(reference_bank: bank.ReferenceBank) -> tuple:
    return (
        reference_bank.model_type,
        reference_bank.config_hash,
        reference_bank.class_name,
        reference_bank.k,
        {name: tensor.tolist() for name, tensor in reference_bank.tensors.items()},
    )


@pytest.fixture
def model_and_bank(make_winclip):
    model = make_winclip()
    references = torch.randn(2, 3, 240, 240, generator=torch.Generator().manual_seed(1))
    return model, model.build_reference_bank(references, class_name="object")


@pytest.mark.parametrize(
    ("old", "new", "arguments"),
    [
        ("make_bank", "bank_from_tensors", lambda built: ("object", 2, built.tensors)),
        ("resolve_bank", "bank_or_default", lambda built: (built,)),
        ("resolve_bank", "bank_or_default", lambda built: (None,)),
        ("require_bank", "required_bank", lambda built: (built, "built from references")),
        ("check_bank", "checked_bank", lambda built: (built,)),
    ],
)
def test_an_old_bank_verb_warns_with_its_new_name_and_returns_what_the_new_one_does(
    model_and_bank, old, new, arguments
):
    model, built = model_and_bank
    with pytest.warns(DeprecationWarning, match=rf"`{old}` is deprecated .*use `{new}`"):
        old_result = getattr(model, old)(*arguments(built))
    assert _fields(old_result) == _fields(getattr(model, new)(*arguments(built)))


def test_an_old_bank_verb_raises_what_the_new_one_raises(model_and_bank):
    model, built = model_and_bank
    foreign = bank.ReferenceBank("afclip", built.config_hash, "object", 2, built.tensors)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="built by a 'afclip' model"):
        model.check_bank(foreign)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="needs a reference bank to score"):
        model.require_bank(None, "to score")


def test_a_bank_names_the_model_type_or_the_config_that_built_it_when_another_asks():
    reference_bank = bank.ReferenceBank("winclip", "abc", "object", 1, {})
    reference_bank.check_built_by("winclip", "abc")
    with pytest.raises(ValueError, match="built by a 'winclip' model, but this model is 'afclip'"):
        reference_bank.check_built_by("afclip", "abc")
    with pytest.raises(ValueError, match=r"another config or backbone \(bank hash abc, model hash def\)"):
        reference_bank.check_built_by("winclip", "def")
