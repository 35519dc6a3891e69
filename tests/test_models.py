from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from negalign_cli.errors import NegalignError
from negalign_cli.models import is_torchscript_archive, list_architectures, load_model, model_fingerprint


def test_tiny_model_is_deterministic(tiny_model):
    again = load_model("negalign-tiny-test")
    assert again.fingerprint == tiny_model.fingerprint
    assert tiny_model.embed_dim == 64 and tiny_model.preprocess_cfg["size"] in (32, (32, 32))
    code = "from negalign_cli.models import load_model; print(load_model('negalign-tiny-test').fingerprint)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == tiny_model.fingerprint


def test_fingerprint_changes_with_one_weight_and_with_preprocessing():
    loaded = load_model("negalign-tiny-test")
    before = model_fingerprint(loaded.model, loaded.config, loaded.preprocess_cfg)
    assert before == loaded.fingerprint
    with torch.no_grad():
        weight = loaded.model.visual.transformer.resblocks[0].mlp.c_fc.weight
        weight.view(-1)[17] += 1e-6
    assert model_fingerprint(loaded.model, loaded.config, loaded.preprocess_cfg) != before
    with torch.no_grad():
        weight.view(-1)[17] -= 1e-6
    assert model_fingerprint(loaded.model, loaded.config, loaded.preprocess_cfg) == before
    other_pp = {**loaded.preprocess_cfg, "interpolation": "bilinear"}
    assert model_fingerprint(loaded.model, loaded.config, other_pp) != before


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["pt", "training", "bin", "safetensors"])
def test_checkpoint_formats_load_the_same_weights(tmp_path, fmt):
    source = load_model("negalign-tiny-test")
    with torch.no_grad():
        for p in source.model.parameters():
            p.add_(0.01)  # weights different from the seeded init
    state = _state(source.model)
    path = tmp_path / f"w.{'pt' if fmt == 'training' else fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items() if k != "attn_mask"}, str(path))
    elif fmt == "training":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)
    loaded = load_model("negalign-tiny-test", str(path))
    assert loaded.weights == str(path.resolve())
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert loaded.fingerprint == model_fingerprint(source.model, source.config, source.preprocess_cfg)
    assert loaded.fingerprint != load_model("negalign-tiny-test").fingerprint


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_openai_torchscript_archive(tmp_path):
    source = load_model("negalign-tiny-test").model
    source.output_dict = False
    traced = torch.jit.trace(
        source, (torch.randn(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)), check_trace=False
    )
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    assert is_torchscript_archive(path)
    loaded = load_model("negalign-tiny-test", str(path))
    assert loaded.config.get("quick_gelu") is True  # OpenAI's models use QuickGELU
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_bad_weights_give_one_line_errors(tmp_path):
    with pytest.raises(NegalignError, match="checkpoint not found"):
        load_model("negalign-tiny-test", str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(NegalignError, match="could not load .*junk.pt as negalign-tiny-test weights"):
        load_model("negalign-tiny-test", str(junk))
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3)}, wrong)
    with pytest.raises(NegalignError, match="could not load"):
        load_model("negalign-tiny-test", str(wrong))
    with pytest.raises(NegalignError, match="unknown model architecture"):
        load_model("ViT-Q-99")
    with pytest.raises(NegalignError, match="needs weights.*--pretrained.*openai.*random"):
        load_model("ViT-L-14")
    with pytest.raises(NegalignError, match="neither a file nor a tag"):
        load_model("ViT-B-16", "no_such_tag")
    with pytest.raises(NegalignError, match="is a folder"):
        load_model("negalign-tiny-test", str(tmp_path))


def test_offline_tag_fails_with_a_hint():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(
        NegalignError, match="could not get the weights ViT-B-32/openai.*--pretrained"
    ) as caught:
        load_model("ViT-B-32", "openai")
    message = str(caught.value)
    assert "set HF_HUB_OFFLINE=1" not in message  # already set: no advice to set it
    assert "negalign-toy" in message
    # the default model is the field's standard, ViT-B-16 with OpenAI's weights
    with pytest.raises(NegalignError, match="could not get the weights ViT-B-16/openai"):
        load_model("ViT-B-16")


def test_precision_and_device():
    bf16 = load_model("negalign-tiny-test", precision="bf16")
    assert bf16.fingerprint == load_model("negalign-tiny-test").fingerprint  # fingerprint is of the weights
    assert bf16.model.visual.conv1.weight.dtype == torch.bfloat16
    with pytest.raises(NegalignError, match="unknown precision"):
        load_model("negalign-tiny-test", precision="int8")


def test_architecture_list():
    infos = {i.name: i for i in list_architectures()}
    assert not infos["negalign-tiny-test"].needs_weights
    assert infos["ViT-B-16"].needs_weights and "openai" in infos["ViT-B-16"].tags
    assert next(iter(infos)) == "negalign-tiny-test"
