from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from negalign_cli.compute.vision import (
    CamConfig,
    cam_batch,
    cam_from_gradients,
    fill_foreground,
    foreground_mask,
    masked_mean,
    vision_tower,
)
from negalign_cli.errors import NegalignError


@pytest.fixture(scope="module")
def setup(tiny_model):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=g)
    classes = F.normalize(torch.randn(3, 64, generator=g), dim=-1)
    return tiny_model.model, images, classes


def reference_cam(model, images, classes, block=-1, method="gradcam"):
    """Full backward through the whole network, retain_grad on the hooked ln_1 output."""
    store = {}

    def hook(module, args, output):
        output.retain_grad()
        store["a"] = output

    handle = model.visual.transformer.resblocks[block].ln_1.register_forward_hook(hook)
    try:
        x = images.clone().requires_grad_(True)
        with torch.enable_grad():
            emb = F.normalize(model.encode_image(x), dim=-1)
            score = (emb @ classes.T).max(dim=-1).values
            score.sum().backward()
    finally:
        handle.remove()
    return cam_from_gradients(store["a"].detach(), store["a"].grad, method).view(-1, 4, 4)


@pytest.mark.parametrize("method", ["gradcam", "gradxact"])
@pytest.mark.parametrize("block", [-1, -2])
def test_cam_equals_full_backward(setup, method, block):
    model, images, classes = setup
    got = cam_batch(model, images, classes, CamConfig(method=method, block=block))
    expected = reference_cam(model, images, classes, block, method)
    torch.testing.assert_close(got.cams, expected, rtol=1e-4, atol=1e-7)
    assert got.cams.abs().sum() > 0


def test_cam_equals_pytorch_grad_cam(setup):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model, images, classes = setup

    class Scores(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return F.normalize(self.model.encode_image(x), dim=-1) @ classes.T

    def reshape(tensor):  # (B, 1+HW, C) -> (B, C, h, w)
        return tensor[:, 1:].reshape(tensor.shape[0], 4, 4, -1).permute(0, 3, 1, 2)

    class PatchGridGradCAM(GradCAM):
        def get_target_width_height(self, input_tensor):
            return 4, 4  # compare on the patch grid, before any upsampling

    wrapped = Scores()
    ours = cam_batch(model, images, classes, CamConfig())
    targets = [ClassifierOutputTarget(int(c)) for c in ours.pred_class]
    with PatchGridGradCAM(
        model=wrapped, target_layers=[model.visual.transformer.resblocks[-1].ln_1], reshape_transform=reshape
    ) as cam:
        theirs = torch.from_numpy(cam(input_tensor=images.clone().requires_grad_(True), targets=targets))
    for i in range(images.shape[0]):
        c = ours.cams[i]
        normalised = (c - c.min()) / (c.max() - c.min() + 1e-7)  # pytorch-grad-cam's scale_cam_image
        torch.testing.assert_close(normalised.float(), theirs[i].float(), rtol=1e-4, atol=1e-4)


def test_gradient_at_the_last_block_output_is_zero(setup):
    """Why the design hooks ln_1: after the last block, patch tokens no longer reach the class token."""
    model, images, classes = setup
    store = {}

    def hook(module, args, output):
        output.retain_grad()
        store["out"] = output

    handle = model.visual.transformer.resblocks[-1].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = images.clone().requires_grad_(True)
            score = (F.normalize(model.encode_image(x), dim=-1) @ classes.T).max(dim=-1).values
            score.sum().backward()
    finally:
        handle.remove()
    grad = store["out"].grad
    assert torch.count_nonzero(grad[:, 1:]) == 0 and grad[:, 0].abs().sum() > 0
    assert torch.count_nonzero(cam_from_gradients(store["out"].detach(), grad, "gradcam")) == 0


def test_batch_equals_single_images(setup):
    model, images, classes = setup
    batch = cam_batch(model, images, classes, CamConfig(bg_pool="maskclip"))
    for i in range(images.shape[0]):
        single = cam_batch(model, images[i : i + 1], classes, CamConfig(bg_pool="maskclip"))
        torch.testing.assert_close(single.cams[0], batch.cams[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(single.embeddings[0], batch.embeddings[i], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(single.background[0], batch.background[i], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        plain = F.normalize(model.encode_image(images), dim=-1)
    torch.testing.assert_close(batch.embeddings, plain, rtol=1e-5, atol=1e-6)


def test_tokens_pool_with_everything_as_background(setup):
    model, images, classes = setup
    config = CamConfig(fg_percentile=100.0, dilate=0)
    visual = model.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(images)
    finally:
        visual.output_tokens = False
    expected = F.normalize((tokens @ visual.proj).mean(dim=1), dim=-1)
    everything = torch.ones(6, 16, dtype=torch.bool)
    torch.testing.assert_close(masked_mean(tokens @ visual.proj, everything), expected)
    # with percentile 100 only the max patch is foreground: background = the other 15 patches
    got = cam_batch(model, images, classes, config)
    keep = ~got.foreground.flatten(1)
    assert (keep.sum(dim=1) == 15).all()
    manual = F.normalize(((tokens @ visual.proj) * keep.unsqueeze(-1)).sum(1) / 15, dim=-1)
    torch.testing.assert_close(got.background, manual, rtol=1e-4, atol=1e-6)


def brute_block(model, x):
    """The last block by hand, per head, in float64."""
    block = model.visual.transformer.resblocks[-1]
    attn = block.attn
    w, b = attn.in_proj_weight.double(), attn.in_proj_bias.double()
    width, heads = x.shape[-1], attn.num_heads
    h = F.layer_norm(
        x.double(), (width,), block.ln_1.weight.double(), block.ln_1.bias.double(), block.ln_1.eps
    )
    q, k, v = (h @ w[i * width : (i + 1) * width].T + b[i * width : (i + 1) * width] for i in range(3))
    hd = width // heads
    clear = torch.zeros_like(q)
    for head in range(heads):
        s = slice(head * hd, (head + 1) * hd)
        a = torch.softmax(q[..., s] @ q[..., s].transpose(-1, -2) / hd**0.5, dim=-1)
        clear[..., s] = a @ v[..., s]
    out_w, out_b = attn.out_proj.weight.double(), attn.out_proj.bias.double()
    value_path = x.double() + v @ out_w.T + out_b
    ln2 = block.ln_2
    y = F.layer_norm(value_path, (width,), ln2.weight.double(), ln2.bias.double(), ln2.eps)
    y = value_path + block.mlp.double()(y)
    block.mlp.float()
    clear = clear @ out_w.T + out_b
    return y, clear


@pytest.mark.parametrize("mode", ["maskclip", "clearclip"])
def test_maskclip_and_clearclip_against_hand_computation(setup, mode):
    model, images, classes = setup
    store = {}
    handle = model.visual.transformer.resblocks[-1].register_forward_pre_hook(
        lambda m, a: store.update(x=a[0])
    )
    with torch.no_grad():
        model.encode_image(images)
    handle.remove()
    value_path, clear = brute_block(model, store["x"])
    raw = value_path if mode == "maskclip" else clear
    visual = model.visual
    ln = visual.ln_post
    tokens = (
        F.layer_norm(raw[:, 1:], (raw.shape[-1],), ln.weight.double(), ln.bias.double(), ln.eps)
        @ visual.proj.double()
    )
    got = cam_batch(model, images, classes, CamConfig(bg_pool=mode))
    keep = (~got.foreground).flatten(1).double().unsqueeze(-1)
    expected = F.normalize((tokens * keep).sum(1) / keep.sum(1), dim=-1).float()
    expected = torch.where(got.valid.unsqueeze(-1), expected, torch.zeros_like(expected))
    torch.testing.assert_close(got.background, expected, rtol=1e-4, atol=1e-5)


def test_mask_mode_re_encodes_with_the_mean(setup):
    model, images, classes = setup
    got = cam_batch(model, images, classes, CamConfig(bg_pool="mask"))
    filled = fill_foreground(images, got.foreground, (8, 8))
    for i in range(images.shape[0]):
        for r in range(4):
            for c in range(4):
                block = filled[i, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8]
                if got.foreground[i, r, c]:
                    assert torch.count_nonzero(block) == 0
                else:
                    assert torch.equal(block, images[i, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8])
    with torch.no_grad():
        expected = F.normalize(model.encode_image(filled), dim=-1)
    expected = torch.where(got.valid.unsqueeze(-1), expected, torch.zeros_like(expected))
    torch.testing.assert_close(got.background, expected, rtol=1e-5, atol=1e-6)


def test_foreground_fraction_and_dilation():
    g = torch.Generator().manual_seed(3)
    cams = torch.rand(50, 10, 10, generator=g)
    fg = foreground_mask(cams, 80.0, dilate=0)
    fraction = fg.flatten(1).float().mean(dim=1)
    assert torch.allclose(fraction, torch.full_like(fraction, 0.2), atol=0.011)
    one = torch.zeros(1, 7, 7)
    one[0, 3, 3] = 1.0
    grown = foreground_mask(one, 99.0, dilate=1)
    assert grown[0].sum() == 9 and grown[0, 2:5, 2:5].all()
    assert foreground_mask(one, 99.0, dilate=2)[0].sum() == 25
    zero_mostly = torch.zeros(1, 5, 5)
    zero_mostly[0, 0, 0] = 2.0
    assert foreground_mask(zero_mostly, 80.0, dilate=0)[0].sum() == 1  # percentile 0 -> strictly positive


def test_invalid_cam_and_unsupported_towers(setup):
    model, images, classes = setup
    got = cam_batch(model, images, classes, CamConfig(fg_percentile=0.0, dilate=0))
    # percentile 0 marks every positive patch as foreground; an image with no zero patch has no background
    for i in range(6):
        if (got.cams[i] > 0).all():
            assert not got.valid[i] and torch.count_nonzero(got.background[i]) == 0

    class NotClip(torch.nn.Module):
        visual = torch.nn.Linear(2, 2)

    with pytest.raises(NegalignError, match="open_clip ViT"):
        vision_tower(NotClip())
    with pytest.raises(NegalignError, match="out of range"):
        CamConfig(block=5).validate(2)
