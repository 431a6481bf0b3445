"""Confidence of the ``markers`` model: scores -> probabilities -> calibrated confidence.

For one unit the scores of the cell types (or candidates) it was compared with become probabilities
with a softmax at a fixed *temperature*; the confidence of the answer is the probability of the chosen
type and its Cell Ontology subtypes among them passed through Platt scaling::

    p = sum of softmax(scores / temperature) over the chosen type and its subtypes
    confidence = 1 / (1 + exp(-(slope * logit(p) + intercept)))

``temperature``, ``slope`` and ``intercept`` are fixed in the package (``data/calibration_v3.json``),
fitted once by ``benchmarks/markers_calibration.py`` on labelled data and never per run, so the same
cell always gets the same confidence. The file records what it was fitted on, the scoring version it
belongs to and the calibration error it reached.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

from .scoring import SCORING_VERSION

log = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_FILE",
    "Calibration",
    "load_calibration",
    "softmax",
    "expected_calibration_error",
]

#: The calibration shipped with the package (``data/``).
CALIBRATION_FILE = "calibration_v3.json"
_EPS = 1e-6


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of ``scores / temperature``; ``-inf`` entries get probability 0."""
    z = np.asarray(scores, dtype=np.float64) / temperature
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


@attrs.frozen
class Calibration:
    """Fixed calibration parameters (see the module docstring).

    ``version`` names the parameter set; ``scoring_version`` the score it was fitted for; ``meta`` keeps
    the rest of the file (what it was fitted on, the measured errors).
    """

    version: str
    temperature: float = attrs.field(validator=attrs.validators.gt(0))
    slope: float = 1.0
    intercept: float = 0.0
    scoring_version: str = SCORING_VERSION
    meta: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Read the fields of a calibration file (the other keys go to ``meta``)."""
        known = {"version", "temperature", "slope", "intercept", "scoring_version"}
        missing = {"version", "temperature"} - set(data)
        if missing:
            raise ValueError(
                f"calibration data lacks {sorted(missing)}; rebuild it with "
                "benchmarks/markers_calibration.py --fit --write"
            )
        return cls(
            version=str(data["version"]),
            temperature=float(data["temperature"]),
            slope=float(data.get("slope", 1.0)),
            intercept=float(data.get("intercept", 0.0)),
            scoring_version=str(data.get("scoring_version", SCORING_VERSION)),
            meta={k: v for k, v in data.items() if k not in known},
        )

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """Softmax of ``scores`` (units x types) at the calibrated temperature."""
        return softmax(scores, self.temperature)

    def confidence(self, p: np.ndarray) -> np.ndarray:
        """Calibrated confidence in [0, 1] for probabilities ``p`` of the chosen answers."""
        z = self.slope * _logit(np.asarray(p, dtype=np.float64)) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))


@functools.cache
def load_calibration() -> Calibration:
    """The calibration shipped with the package (read once per process).

    Warns (``UserWarning``) when it was fitted for another scoring version than this one's.
    """
    resource = importlib.resources.files(__package__).joinpath("data").joinpath(CALIBRATION_FILE)
    with resource.open("r", encoding="utf-8") as fh:
        calibration = Calibration.from_dict(json.load(fh))
    if calibration.scoring_version != SCORING_VERSION:
        warnings.warn(
            f"{CALIBRATION_FILE} was fitted for scoring {calibration.scoring_version!r}, not "
            f"{SCORING_VERSION!r}: confidences may be miscalibrated. Refit it with "
            "benchmarks/markers_calibration.py --write.",
            UserWarning,
            stacklevel=2,
        )
    log.debug("loaded calibration %s (temperature %.3g)", calibration.version, calibration.temperature)
    return calibration


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins over [0, 1].

    ``sum over bins of (cells in bin / all cells) * |accuracy in bin - mean confidence in bin|``; a
    confidence of exactly 1 falls in the last bin, empty bins count 0.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return 0.0
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)
