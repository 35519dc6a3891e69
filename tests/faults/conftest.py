"""Fixtures shared by the fault tests."""

from __future__ import annotations

import pytest

from tests.helpers.images import make_image_folder


@pytest.fixture()
def folder(tmp_path):
    """An image folder of 8 images (4 per class) under the test's tmp_path."""
    return make_image_folder(tmp_path / "imgs", per_class=4)
