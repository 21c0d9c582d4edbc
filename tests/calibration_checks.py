"""Comparing calibrations of the same images scored in other batches (the CLI's, the pipeline's and
`calibrate`'s batch sizes are independent options)."""

from __future__ import annotations

import dataclasses

import pytest

from hf_fsad.calibration import Calibration

# A batch of another size may run other float32 kernels (another reduction order): the same image's score
# moves by a few ulp, ~1e-7 relative; 1e-5 bounds it with room. The scores here lie in [0, 2], so 1e-7
# absolute is that rounding for scores near 0.
BATCHING_REL, BATCHING_ABS = 1e-5, 1e-7


def assert_same_calibration(actual: Calibration, expected: Calibration) -> None:
    """Rules, sources, counts and the other exact fields equal; thresholds, scales, rates and the kept
    scores equal up to the rounding that batching moves them by. Order statistics of scores this far apart
    do not swap, so what the scores decide (counts, rates) agrees."""
    for field in dataclasses.fields(Calibration):
        value, wanted = getattr(actual, field.name), getattr(expected, field.name)
        if isinstance(wanted, float) or (isinstance(wanted, tuple) and wanted):
            assert value == pytest.approx(wanted, rel=BATCHING_REL, abs=BATCHING_ABS), field.name
        else:
            assert value == wanted, field.name
