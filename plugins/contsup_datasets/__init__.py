"""Built-in datasets: ``digits`` (scikit-learn's bundled digits, the offline default) and
``synthetic`` (seeded random images of any shape)."""

from __future__ import annotations

from contsup import hookimpl

from contsup_datasets.digits import Digits
from contsup_datasets.synthetic import Synthetic


@hookimpl
def register_datasets(register):
    register(Digits)
    register(Synthetic)
