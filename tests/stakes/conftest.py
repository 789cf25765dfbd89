"""Shared fixtures for the framework tests: the bundled digits data, one pretrained model and the
MiniLM anchors, built once per test session in a temporary cache (also used by the CLI tests)."""

import pytest
import torch


@pytest.fixture(scope="session")
def stakes_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("stakes_cache")


@pytest.fixture(scope="session")
def digits():
    from stakes.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits_model(digits, stakes_cache):
    from stakes.pretrain import pretrained_model

    model, meta = pretrained_model("digits", data=digits, cache_dir=stakes_cache, progress=False)
    return model


@pytest.fixture(scope="session")
def digits_anchors(digits):
    from stakes.anchors import build_anchors

    return build_anchors(digits.class_names, descriptions="digits", encoder="minilm")


@pytest.fixture
def forget_set(digits):
    from stakes.data import sample_forget_indices

    idx = sample_forget_indices(digits.train_y, 8, 0)
    return digits.train_x[idx], digits.train_y[idx]


@pytest.fixture
def fast_config():
    """A stable-preset config small enough for unit tests (few PGD steps, few optimisation steps)."""
    from stakes.methods import preset

    def make(method="structguard", **over):
        values = dict(repetitions=2, pgd_steps=5, eps=1.0, max_steps=4, log_every=2, progress=False, stop_warmup_steps=100,
                      backend="reference")
        values.update(over)
        return preset("stable", method=method, **values)

    return make
