"""Fixtures for the unit tests: tiny hand-built graphs only (nothing here builds the model zoo)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from .toy import Toy, build, run, token_ids


@pytest.fixture(scope="session")
def toy_config() -> Toy:
    return Toy()


@pytest.fixture(scope="session")
def toy(toy_config) -> onnx.ModelProto:
    """The default 2-layer toy decoder (do not mutate: it is shared by the session)."""
    return build(toy_config)


@pytest.fixture(scope="session")
def ids(toy_config) -> np.ndarray:
    return token_ids(toy_config)


@pytest.fixture(scope="session")
def toy_logits(toy, ids) -> np.ndarray:
    return run(toy, ids)
