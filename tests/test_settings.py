from __future__ import annotations

from pathlib import Path

import pytest
import torch

from negalign_cli.cache.workspace import parse_age
from negalign_cli.errors import NegalignError
from negalign_cli.settings import Runtime, resolve_cache_dir, resolve_device, resolve_precision


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("NEGALIGN_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("NEGALIGN_CACHE")
    assert resolve_cache_dir() == Path(".negalign-cache")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NegalignError, match="not a folder"):
        resolve_cache_dir(tmp_path / "file")


def test_device_and_precision(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("NEGALIGN_DEVICE", "cpu")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(NegalignError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(NegalignError, match="CUDA is not available"):
            resolve_device("cuda:1")
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(NegalignError, match="fp16 needs a CUDA"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(NegalignError, match="at least 1"):
        Runtime.create(device="cpu", batch_size=0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("2w", 1209600), ("1.5h", 5400)],
)
def test_parse_age(text, seconds):
    assert parse_age(text) == seconds


def test_parse_age_rejects_garbage():
    with pytest.raises(NegalignError):
        parse_age("3 days")
