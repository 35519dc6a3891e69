from __future__ import annotations

import numpy as np
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
    # an invalid CAM pools every patch (the fallback)
    keep = (~got.foreground | ~got.valid.view(-1, 1, 1)).flatten(1).double().unsqueeze(-1)
    expected = F.normalize((tokens * keep).sum(1) / keep.sum(1), dim=-1).float()
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
        whole = F.normalize(model.encode_image(images), dim=-1)  # the fallback: nothing filled
    expected = torch.where(got.valid.unsqueeze(-1), expected, whole)
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


def _final_tokens(model, images):
    store = {}
    handle = model.visual.transformer.register_forward_hook(lambda m, a, out: store.update(x=out))
    with torch.no_grad():
        model.encode_image(images)
    handle.remove()
    x = store["x"]
    return model.visual.ln_post(x[:, 1:]) @ model.visual.proj


def test_invalid_cam_and_unsupported_towers(setup):
    model, images, classes = setup
    got = cam_batch(model, images, classes, CamConfig(method="gradxact", fg_percentile=0.0, dilate=0))
    # gradxact is positive almost everywhere; percentile 0 marks every positive patch as foreground; an image with no zero patch has no
    # background, and its background embedding falls back to the whole image's pooled tokens
    whole = cam_batch(model, images, classes, CamConfig(fg_percentile=100.0, dilate=0))
    tokens_everywhere = masked_mean(_final_tokens(model, images), torch.ones(6, 4, 4, dtype=torch.bool))
    invalid = 0
    for i in range(6):
        if (got.cams[i] > 0).all():
            invalid += 1
            assert not got.valid[i]
            torch.testing.assert_close(got.background[i], tokens_everywhere[i], rtol=1e-5, atol=1e-6)
    assert invalid > 0 and whole.valid.all()

    class NotClip(torch.nn.Module):
        visual = torch.nn.Linear(2, 2)

    with pytest.raises(NegalignError, match="open_clip ViT"):
        vision_tower(NotClip())
    with pytest.raises(NegalignError, match="out of range"):
        CamConfig(block=5).validate(2)


# --------------------------------------------------------------------------- exact foreground rule
def numpy_foreground(cams: np.ndarray, percentile: float, dilate: int) -> np.ndarray:
    """The documented rule in numpy float64: CAM ≥ np.percentile (strictly positive when that is
    0), then `dilate` rounds of 3×3 growth written as a loop over the 8 neighbours."""
    b, h, w = cams.shape
    flat = cams.reshape(b, -1).astype(np.float64)
    threshold = np.percentile(flat, percentile, axis=1, keepdims=True)
    mask = np.where(threshold > 0, flat >= threshold, flat > 0).reshape(b, h, w)
    for _ in range(dilate):
        grown = mask.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                shifted = np.zeros_like(mask)
                ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
                xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
                shifted[:, yd, xd] = mask[:, ys, xs]
                grown |= shifted
        mask = grown
    return mask


def _cam_samples(side: int, seed: int) -> np.ndarray:
    """Float32 CAMs of three kinds: uniform, ReLU'd Gaussians (many zeros) and coarse ties."""
    rng = np.random.default_rng(seed)
    uniform = rng.random((300, side, side))
    relu = np.maximum(rng.standard_normal((300, side, side)), 0.0)
    ties = rng.integers(0, 5, (300, side, side)) / 4.0
    return np.concatenate([uniform, relu, ties]).astype(np.float32)


@pytest.mark.parametrize("side", [4, 7, 8, 14, 16])  # 14×14: ViT-B/16 at 224 px; 16×16: ViT-L/14
@pytest.mark.parametrize("percentile", [80.0, 50.0, 90.0, 0.0, 100.0, 33.3])
def test_foreground_equals_numpy_float64_rule(side, percentile):
    cams = _cam_samples(side, seed=side)
    for dilate in (0, 1):
        got = foreground_mask(torch.from_numpy(cams), percentile, dilate).numpy()
        expected = numpy_foreground(cams, percentile, dilate)
        differing = int((got != expected).any(axis=(1, 2)).sum())
        assert differing == 0, f"{differing} of {len(cams)} masks differ at {side}×{side}, p={percentile}"


@pytest.mark.parametrize("side", [4, 14, 16])
def test_foreground_keeps_the_patch_at_the_percentile(side):
    """Where 0.8·(n−1) is an integer k, distinct values give exactly n − k foreground patches (a
    float32 quantile gave n − k − 1 in about half of all images)."""
    n = side * side
    k = 80 * (n - 1) // 100
    assert 80 * (n - 1) % 100 == 0
    cams = torch.from_numpy(_cam_samples(side, seed=1)[:300])  # uniform: distinct values
    counts = foreground_mask(cams, 80.0, 0).flatten(1).sum(dim=1)
    assert torch.all(counts == n - k)


def test_exact_percentile_matches_numpy():
    from negalign_cli.compute.quantile import percentile, quantile

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 16, 49, 64, 196, 256, 577):
        values = rng.standard_normal((20, n)).astype(np.float32)
        for p in (0.0, 12.5, 50.0, 80.0, 95.0, 99.9, 100.0):
            got = percentile(torch.from_numpy(values), p, dim=1).numpy()
            expected = np.percentile(values.astype(np.float64), p, axis=1)
            if (p * (n - 1)) % 100 == 0:  # an order statistic itself: bit for bit
                np.testing.assert_array_equal(got, expected)
            else:  # numpy rounds p/100 first, which may move the position by an ulp
                np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)
        np.testing.assert_array_equal(
            quantile(torch.from_numpy(values), 0.8, dim=1).numpy(),
            np.quantile(values.astype(np.float64), 0.8, axis=1),
        )
    with pytest.raises(ValueError):
        percentile(torch.zeros(3), 101.0)


def vit_14x14():
    """A small open_clip ViT on the grid ViT-B/16 uses at 224 px (14×14 patches)."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 56, "patch_size": 4, "layers": 2, "width": 32, "head_width": 16},
        text_cfg={"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    ).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@pytest.mark.parametrize("method", ["gradcam", "gradxact"])
def test_cam_validity_on_a_14x14_grid_follows_the_rule(method):
    """cam_valid and the foreground of a batched CAM on a real-size grid equal the numpy rule
    applied to the same CAMs (the float32 quantile marked images with an empty background valid)."""
    model = vit_14x14()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(24, 3, 56, 56, generator=g)
    classes = F.normalize(torch.randn(5, 32, generator=g), dim=-1)
    for percentile, dilate in ((80.0, 1), (80.0, 0), (50.0, 2)):
        got = cam_batch(
            model, images, classes, CamConfig(method=method, fg_percentile=percentile, dilate=dilate)
        )
        assert got.cams.shape == (24, 14, 14)
        expected = numpy_foreground(got.cams.numpy(), percentile, dilate)
        np.testing.assert_array_equal(got.foreground.numpy(), expected)
        cams = got.cams.flatten(1)
        expected_valid = (cams.amax(dim=1) > 0).numpy() & ~expected.reshape(24, -1).all(axis=1)
        np.testing.assert_array_equal(got.valid.numpy(), expected_valid)


def test_packed_cam_rows_round_trip(setup):
    """The per-image cache stores one float32 row per image; unpacking gives the batch back."""
    from negalign_cli.compute.vision import cam_row_width, pack_cam_rows, unpack_cam_rows

    model, images, classes = setup
    got = cam_batch(model, images, classes, CamConfig())
    rows = pack_cam_rows(got)
    assert rows.shape == (6, cam_row_width(64, 16)) and rows.dtype == np.float32
    back = unpack_cam_rows(rows, 64, (4, 4))
    np.testing.assert_array_equal(back.background, got.background.numpy())
    np.testing.assert_array_equal(back.cams, got.cams.numpy())
    np.testing.assert_array_equal(back.foreground, got.foreground.numpy())
    np.testing.assert_array_equal(back.pred_class, got.pred_class.numpy())
    np.testing.assert_array_equal(back.valid, got.valid.numpy())
    np.testing.assert_allclose(back.fg_fraction, got.foreground.flatten(1).float().mean(1).numpy())
    with pytest.raises(ValueError, match="columns"):
        unpack_cam_rows(rows[:, :-1], 64, (4, 4))
