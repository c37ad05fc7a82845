"""Tests for fastseg.models: the reference networks, the U-Net loss and weight map, elastic deformation.

Full-size networks are built on the meta device (parameters without storage: counting and key checks cost
nothing); forward passes use scaled-down widths (base_width) and small inputs, so the file runs in seconds.
"""

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastseg.models import (
    MODELS,
    deeplab_v1_largefov,
    deeplab_v2_resnet101,
    deeplabv3_resnet50,
    deeplabv3_resnet101,
    elastic_deform,
    fcn8s,
    fcn_resnet50,
    fcn_resnet101,
    get_model,
    segnet,
    unet,
    unet_output_size,
    unet_weight_map,
    weighted_cross_entropy,
)
from fastseg.models.fcn import bilinear_kernel

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one intra-op thread: these networks are tiny, and under `pytest -n 2` on two cores the
    workers' thread pools otherwise contend for the cores and every small op waits (tests ran 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def num_parameters(model):
    return sum(p.numel() for p in model.parameters())


def on_meta(constructor, **kwargs):
    with torch.device("meta"):
        return constructor(**kwargs)


# Scaled-down builds for forward passes: (constructor, kwargs, in_channels).
TINY = {
    "fcn8s": (fcn8s, dict(num_classes=3, base_width=2, fc_channels=8), 3),
    "fcn_resnet50": (fcn_resnet50, dict(num_classes=3, base_width=2), 3),
    "fcn_resnet101": (fcn_resnet101, dict(num_classes=3, base_width=2), 3),
    "unet": (unet, dict(in_channels=1, num_classes=3, base_width=2, padding=True), 1),
    "deeplab_v1_largefov": (deeplab_v1_largefov, dict(num_classes=3, base_width=2, fc_channels=8), 3),
    "deeplab_v2_resnet101": (deeplab_v2_resnet101, dict(num_classes=3, base_width=2), 3),
    "deeplabv3_resnet50": (deeplabv3_resnet50, dict(num_classes=3, base_width=2), 3),
    "deeplabv3_resnet101": (deeplabv3_resnet101, dict(num_classes=3, base_width=2), 3),
    "segnet": (segnet, dict(num_classes=3, base_width=2), 3),
}


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------
def test_registry_lists_every_network():
    assert set(MODELS) == set(TINY)
    model = get_model("unet", base_width=2)
    assert isinstance(model, nn.Module)


def test_get_model_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="unknown model 'fcn32s'.*deeplabv3_resnet50.*unet"):
        get_model("fcn32s")


# --------------------------------------------------------------------------------------------------------------
# parameter counts at the papers' widths (meta device)
# --------------------------------------------------------------------------------------------------------------
def _vgg16_conv_parameters():
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    return sum(c_in * c_out * 9 + c_out for c_in, c_out in zip([3] + widths[:-1], widths))


def test_fcn8s_parameter_count():
    fc = 512 * 49 * 4096 + 4096 + 4096 * 4096 + 4096
    scorers = (4096 + 1) * 21 + (512 + 1) * 21 + (256 + 1) * 21
    upsampling = 21 * 21 * (4 * 4 + 4 * 4 + 16 * 16)
    count = num_parameters(on_meta(fcn8s, num_classes=21))
    assert count == _vgg16_conv_parameters() + fc + scorers + upsampling
    assert round(count / 1e6) == 134  # the paper's VGG-16 FCN


def test_unet_parameter_and_convolution_count():
    model = on_meta(unet, in_channels=1, num_classes=2)
    assert round(num_parameters(model) / 1e6, 1) == 31.0
    convolutions = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convolutions) == 23  # "In total the network has 23 convolutional layers."
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in convolutions) == 4


@pytest.mark.parametrize("constructor, millions", [(deeplab_v1_largefov, 20.5), (segnet, 29.4)])
def test_vgg_based_parameter_counts(constructor, millions):
    # DeepLab-LargeFOV: 20.5 M in the DeepLab v1 paper's table; SegNet: 29.5 M in its paper (29.45 M here with
    # CamVid's 11 classes).
    assert round(num_parameters(on_meta(constructor)) / 1e6, 1) == millions


@pytest.mark.parametrize("constructor, count", [
    # torchvision's published num_params of its COCO-with-VOC-labels weights (21 classes, aux_loss=True).
    (fcn_resnet50, 35_322_218),
    (fcn_resnet101, 54_314_346),
    (deeplabv3_resnet50, 42_004_074),
    (deeplabv3_resnet101, 60_996_202),
])
def test_torchvision_style_parameter_counts(constructor, count):
    assert num_parameters(on_meta(constructor, num_classes=21, aux_loss=True)) == count


def test_deeplab_v2_parameter_count():
    resnet101_trunk = 44_549_160 - (2048 * 1000 + 1000)  # torchvision's resnet101 without its fc
    aspp = 4 * (2048 * 9 * 21 + 21)
    assert num_parameters(on_meta(deeplab_v2_resnet101, num_classes=21)) == resnet101_trunk + aspp


# --------------------------------------------------------------------------------------------------------------
# torchvision's names and shapes
# --------------------------------------------------------------------------------------------------------------
def _bn(name, channels):
    return [(f"{name}.{field}", (channels,)) for field in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{name}.num_batches_tracked", ())]


def torchvision_resnet_entries(blocks):
    """(key, shape) of torchvision's ResNet trunk inside its segmentation models, in state_dict order, written
    from torchvision.models.resnet (Bottleneck: conv1/bn1, conv2/bn2, conv3/bn3, downsample.0/1 in block 0)."""
    entries = [("backbone.conv1.weight", (64, 3, 7, 7))] + _bn("backbone.bn1", 64)
    inplanes = 64
    for stage, (count, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for block in range(count):
            p = f"backbone.layer{stage}.{block}"
            entries += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1))] + _bn(f"{p}.bn1", planes)
            entries += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes)
            entries += [(f"{p}.conv3.weight", (4 * planes, planes, 1, 1))] + _bn(f"{p}.bn3", 4 * planes)
            if block == 0:
                entries += [(f"{p}.downsample.0.weight", (4 * planes, inplanes, 1, 1))]
                entries += _bn(f"{p}.downsample.1", 4 * planes)
            inplanes = 4 * planes
    return entries


def fcn_head_entries(prefix, in_channels, num_classes):
    inter = in_channels // 4
    return ([(f"{prefix}.0.weight", (inter, in_channels, 3, 3))] + _bn(f"{prefix}.1", inter)
            + [(f"{prefix}.4.weight", (num_classes, inter, 1, 1)), (f"{prefix}.4.bias", (num_classes,))])


def deeplab_head_entries(num_classes):
    entries = [("classifier.0.convs.0.0.weight", (256, 2048, 1, 1))] + _bn("classifier.0.convs.0.1", 256)
    for branch in (1, 2, 3):
        entries += [(f"classifier.0.convs.{branch}.0.weight", (256, 2048, 3, 3))]
        entries += _bn(f"classifier.0.convs.{branch}.1", 256)
    entries += [("classifier.0.convs.4.1.weight", (256, 2048, 1, 1))] + _bn("classifier.0.convs.4.2", 256)
    entries += [("classifier.0.project.0.weight", (256, 5 * 256, 1, 1))] + _bn("classifier.0.project.1", 256)
    entries += [("classifier.1.weight", (256, 256, 3, 3))] + _bn("classifier.2", 256)
    return entries + [("classifier.4.weight", (num_classes, 256, 1, 1)), ("classifier.4.bias", (num_classes,))]


TORCHVISION_LAYOUTS = {
    "deeplabv3_resnet50": (deeplabv3_resnet50, (3, 4, 6, 3), "deeplab"),
    "deeplabv3_resnet101": (deeplabv3_resnet101, (3, 4, 23, 3), "deeplab"),
    "fcn_resnet50": (fcn_resnet50, (3, 4, 6, 3), "fcn"),
    "fcn_resnet101": (fcn_resnet101, (3, 4, 23, 3), "fcn"),
}


@pytest.mark.parametrize("aux_loss", [False, True])
@pytest.mark.parametrize("name", sorted(TORCHVISION_LAYOUTS))
def test_state_dict_layout_is_torchvisions(name, aux_loss):
    constructor, blocks, head = TORCHVISION_LAYOUTS[name]
    num_classes = 5
    expected = torchvision_resnet_entries(blocks)
    if head == "deeplab":
        expected += deeplab_head_entries(num_classes)
    else:
        expected += fcn_head_entries("classifier", 2048, num_classes)
    if aux_loss:
        expected += fcn_head_entries("aux_classifier", 1024, num_classes)
    model = on_meta(constructor, num_classes=num_classes, aux_loss=aux_loss)
    actual = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    assert actual == expected


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "fcn_resnet50"])
def test_torchvision_checkpoint_loads_and_gives_the_same_scores(name):
    import torchvision.models.segmentation as tv

    torch.manual_seed(0)
    reference = getattr(tv, name)(weights=None, weights_backbone=None, num_classes=4, aux_loss=True).eval()
    model = TORCHVISION_LAYOUTS[name][0](num_classes=4, aux_loss=True).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 40, 36)
    with torch.no_grad():
        expected, actual = reference(x), model(x)
    for key in ("out", "aux"):
        torch.testing.assert_close(actual[key], expected[key])


# --------------------------------------------------------------------------------------------------------------
# shapes, modes, gradients, errors
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TINY))
def test_output_is_the_input_size(name):
    constructor, kwargs, in_channels = TINY[name]
    model = constructor(**kwargs).eval()
    with torch.no_grad():
        for height, width in ((33, 47), (64, 35)):
            out = model(torch.randn(2, in_channels, height, width))
            assert out.shape == (2, 3, height, width)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(TINY))
def test_wrong_channel_count_is_a_clear_error(name):
    constructor, kwargs, in_channels = TINY[name]
    model = on_meta(constructor, **kwargs)
    with pytest.raises(ValueError, match=rf"expects an input of shape \[N, {in_channels}, H, W\]"):
        model(torch.empty(1, in_channels + 1, 64, 64, device="meta"))


def test_fcn8s_takes_any_input_size():
    model = on_meta(fcn8s, num_classes=2, base_width=1, fc_channels=2)
    for height, width in [(1, 1), (2, 3), (7, 31), (32, 33), (63, 64), (97, 130), (500, 375)]:
        out = model(torch.empty(1, 3, height, width, device="meta"))
        assert out.shape == (1, 2, height, width)


def _identity_fcn8s(path):
    """A 1-channel, 1-class FCN-8s whose convolutions copy channel 0 through their centre tap and whose only
    non-zero scorer is `path` ("score_fr", "score_pool4" or "score_pool3"): its output is the bilinear
    upsampling of that one map, crops included."""
    model = fcn8s(num_classes=1, base_width=1, fc_channels=1, dropout=0.0).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.zero_()
                module.bias.zero_()
                kh, kw = module.kernel_size
                module.weight[0, 0, kh // 2, kw // 2] = 1.0
        for scorer in ("score_fr", "score_pool4", "score_pool3"):
            getattr(model, scorer).weight.fill_(1.0 if scorer == path else 0.0)
    return model


@pytest.mark.parametrize("path, stride", [("score_fr", 32), ("score_pool4", 16), ("score_pool3", 8)])
def test_fcn8s_crops_align_each_path_with_the_input(path, stride):
    # An impulse at input row/column r lands in the coarse cell q = (r + 99) // stride (conv1_1's padding of 100
    # less its centre tap); that cell's receptive-field centre is stride * q - 99 + (stride - 1) / 2. The
    # bilinear upsamplings are symmetric tents, so the output peaks symmetrically about that centre if and only
    # if every crop offset is right (one pixel off breaks the symmetry).
    model = _identity_fcn8s(path)
    size = 80
    for r in (5, 30, 41):
        x = torch.zeros(1, 3, size, size)
        x[0, 0, r, r] = 1.0
        with torch.no_grad():
            profile = model(x)[0, 0, :, r]  # the output is separable: its column profile is the row tent
        centre = stride * ((r + 99) // stride) - 99 + (stride - 1) / 2
        lo, hi = math.floor(centre), math.ceil(centre)
        assert profile.max() > 0 and torch.isclose(profile[lo], profile.max()), (r, centre, profile.argmax())
        for k in range(min(4, lo + 1, size - hi)):
            torch.testing.assert_close(profile[lo - k], profile[hi + k])


def test_fcn8s_starts_at_zero_scores_with_gradients_on_the_scorers():
    # The paper zero-initialises the class scorers: the first predictions are 0, the first step trains them.
    # fc_channels 32, not fewer: with 8, dropout and ReLU zeroed every fc7 channel in 5 of 300 seeds, and
    # score_fr then rightly got no gradient.
    model = fcn8s(num_classes=3, base_width=4, fc_channels=32)
    x = torch.randn(2, 3, 20, 24)
    out = model(x)
    assert (out == 0).all()
    F.cross_entropy(out, torch.randint(0, 3, (2, 20, 24))).backward()
    assert model.score_fr.weight.grad.abs().sum() > 0
    assert model.score_pool3.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("factor", [2, 8])
def test_transposed_convolutions_start_as_bilinear_upsampling(factor):
    model = on_meta(fcn8s, num_classes=3)
    up = model.upscore2 if factor == 2 else model.upscore8
    assert up.kernel_size == (2 * factor, 2 * factor) and up.stride == (factor, factor)
    weight = bilinear_kernel(3, 2 * factor)
    # With padding factor / 2 the same kernel is F.interpolate(..., "bilinear", align_corners=False) away from
    # the border.
    deconv = nn.ConvTranspose2d(3, 3, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        deconv.weight.copy_(weight)
        x = torch.randn(1, 3, 6, 7)
        expected = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        torch.testing.assert_close(deconv(x)[..., factor:-factor, factor:-factor],
                                   expected[..., factor:-factor, factor:-factor])
    assert weight[0, 1].abs().sum() == 0  # channels do not mix


def test_fcn8s_upsamplings_are_initialised_bilinear():
    model = fcn8s(num_classes=3, base_width=1, fc_channels=2)
    for up in (model.upscore2, model.upscore_pool4, model.upscore8):
        torch.testing.assert_close(up.weight, bilinear_kernel(3, up.kernel_size[0]))
        assert up.weight.requires_grad  # learnable, as in the paper


def test_unet_valid_form_sizes():
    assert unet_output_size(572) == 388
    assert unet_output_size(188) == 4  # the smallest tile
    for size in (571, 187, 580):
        with pytest.raises(ValueError):
            unet_output_size(size)
    assert unet_output_size(100, padding=True) == 100
    model = unet(in_channels=1, num_classes=2, base_width=2)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 572, 188)).shape == (1, 2, 388, 4)


def test_unet_valid_form_names_the_nearest_sizes():
    model = on_meta(unet, base_width=2)
    with pytest.raises(ValueError, match="nearest valid input sizes: 556 and 572"):
        model(torch.empty(1, 1, 560, 572, device="meta"))


def test_unet_padded_form_keeps_odd_sizes_and_rejects_tiny_inputs():
    model = unet(in_channels=2, num_classes=4, base_width=2, padding=True, batch_norm=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 2, 17, 31)).shape == (1, 4, 17, 31)
    with pytest.raises(ValueError, match="at least 16"):
        model(torch.randn(1, 2, 15, 64))


def test_unet_valid_form_crops_the_centre():
    # Overlap-tile: output pixel j of a valid-form tile is input pixel j + 92 (half of 572 - 388). A 188 tile
    # cut from a 204 image at offset 16 (a multiple of the deepest pool's 16, so the pool grids agree) must
    # reproduce the 204 tile's output at offset 16, which needs the centre crop of every skip to be right.
    model = unet(in_channels=1, num_classes=2, base_width=2, dropout=0.0).eval()
    x = torch.randn(1, 1, 204, 204)
    with torch.no_grad():
        whole = model(x)
        for offset in (0, 16):
            tile = model(x[..., offset:offset + 188, offset:offset + 188])
            torch.testing.assert_close(tile, whole[..., offset:offset + 4, offset:offset + 4])


def test_train_and_eval_modes():
    model = unet(in_channels=1, num_classes=2, base_width=2, padding=True, batch_norm=True, dropout=0.5)
    x = torch.randn(2, 1, 32, 32)
    bn = model.encoder[0][1]
    model.train()
    first, second = model(x), model(x)
    assert not torch.equal(first, second)  # dropout
    assert bn.num_batches_tracked == 2
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    assert bn.num_batches_tracked == 2


def test_deeplabv3_trains_with_aux_head_and_returns_torchvisions_dict():
    model = deeplabv3_resnet50(num_classes=3, aux_loss=True, base_width=2, output_stride=16,
                               multi_grid=(1, 2, 4)).train()
    out = model(torch.randn(2, 3, 33, 33))
    assert list(out) == ["out", "aux"] and out["aux"].shape == (2, 3, 33, 33)
    rates = [block.conv2.dilation[0] for block in model.backbone.layer4]
    assert rates == [2, 4, 8]  # the paper's example: output stride 16, Multi_Grid (1, 2, 4)
    assert model.classifier[0].convs[1][0].dilation == (6, 6)


def test_gradients_reach_every_parameter():
    model = unet(in_channels=1, num_classes=2, base_width=2, padding=True, batch_norm=True)
    out = model(torch.randn(2, 1, 32, 32))
    F.cross_entropy(out, torch.randint(0, 2, (2, 32, 32))).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_conv_bn_relu_runs_are_sequential_neighbours():
    # fastseg's converter fuses Conv2d -> BatchNorm2d -> ReLU chains found inside nn.Sequential containers:
    # every BatchNorm in a Sequential must directly follow its convolution.
    for name in MODELS:
        model = on_meta(TINY[name][0], **TINY[name][1])
        for container in model.modules():
            if not isinstance(container, nn.Sequential):
                continue
            children = list(container)
            for i, child in enumerate(children):
                if isinstance(child, nn.BatchNorm2d):
                    assert i > 0 and isinstance(children[i - 1], nn.Conv2d), name
                    assert children[i - 1].out_channels == child.num_features, name


def test_resnet_forwards_are_fx_traceable():
    # fastseg's converter proves conv -> BN -> ReLU order outside nn.Sequential by torch.fx-tracing the parent's
    # forward: the ResNet trunk (its stem), the bottleneck and ASPP's image pooling must trace.
    model = on_meta(deeplabv3_resnet50, num_classes=3, base_width=2, aux_loss=True)
    for module in (model.backbone, model.backbone.layer1[0], model.classifier[0].convs[4]):
        graph = torch.fx.symbolic_trace(module).graph
        called = [node.target for node in graph.nodes if node.op == "call_module"]
        assert len(called) == len(set(called))  # every module runs once


# --------------------------------------------------------------------------------------------------------------
# SegNet's unpooling
# --------------------------------------------------------------------------------------------------------------
def test_segnet_unpools_with_the_encoder_indices():
    model = segnet(num_classes=3, base_width=2).eval()
    pool_indices, unpool_calls = [], []
    for layer in model.features:
        if isinstance(layer, nn.MaxPool2d):
            layer.register_forward_hook(lambda m, args, out: pool_indices.append(out[1]))
    model.unpool.register_forward_hook(lambda m, args, out: unpool_calls.append((args[0], args[1], out)))
    with torch.no_grad():
        model(torch.randn(2, 3, 35, 64))
    assert len(pool_indices) == len(unpool_calls) == 5
    for indices, (values, used, out) in zip(reversed(pool_indices), unpool_calls):
        assert used is indices  # each decoder stage uses its mirror encoder stage's argmax positions
        flat = out.flatten(2)
        torch.testing.assert_close(flat.gather(2, used.flatten(2)), values.flatten(2))
        # everything else is zero: the unpooled map holds exactly the pooled values
        torch.testing.assert_close(flat.abs().sum(), values.abs().sum())


def test_segnet_output_follows_the_argmax_positions():
    # Same pooled values, different argmax positions -> a different decoder input -> different scores.
    model = segnet(num_classes=3, base_width=2).eval()
    x = torch.randn(1, 3, 32, 32)
    first_pool = model.features[6]
    with torch.no_grad():
        reference = model(x)
        first_pool.register_forward_hook(lambda m, args, out: (out[0], (out[1] + 1) % 32 + out[1] // 32 * 32))
        moved = model(x)
    assert not torch.allclose(reference, moved)


# --------------------------------------------------------------------------------------------------------------
# DeepLab with dense-CRF refinement
# --------------------------------------------------------------------------------------------------------------
def test_deeplab_crf_refines_the_scores():
    from fastseg.nn import DenseCRF

    model = deeplab_v1_largefov(num_classes=3, base_width=2, fc_channels=8).eval()
    x = torch.rand(1, 3, 24, 20) * 255  # an un-normalised image: the CRF compares raw colours
    crf = DenseCRF(iterations=3, bilateral_sxy=10.0, bilateral_srgb=20.0)
    with torch.no_grad():
        scores = model(x)
        model.crf = crf
        refined = model(x)  # image defaults to x
        refined_with_x = model(x, image=x)
        refined_with_other = model(x, image=x.flip(-1))
    assert refined.shape == scores.shape and torch.isfinite(refined).all()
    assert not torch.allclose(refined, scores)
    torch.testing.assert_close(refined, torch.log(crf(scores, x)))
    torch.testing.assert_close(refined_with_x, refined)
    assert not torch.allclose(refined_with_other, refined)  # the bilateral kernel reads the image
    torch.testing.assert_close(refined.exp().sum(1), torch.ones(1, 24, 20))  # log-marginals


@pytest.mark.parametrize("constructor", [deeplab_v2_resnet101, deeplabv3_resnet50])
def test_resnet_deeplabs_take_a_crf(constructor):
    from fastseg.nn import DenseCRF

    model = constructor(num_classes=2, base_width=2, crf=DenseCRF(iterations=2)).eval()
    x = torch.rand(1, 3, 17, 19) * 255
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 2, 17, 19)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(1, 17, 19))
    with pytest.raises(ValueError, match="image must be"):
        model(x, image=x[..., :10])


# --------------------------------------------------------------------------------------------------------------
# U-Net weight map and weighted loss
# --------------------------------------------------------------------------------------------------------------
def _brute_force_weight_map(labels, w0, sigma, class_weights):
    h, w = labels.shape
    coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2).astype(float)
    cells = [k for k in np.unique(labels) if k != 0]
    distances = np.stack([np.sqrt(((coords[:, None] - coords[labels.reshape(-1) == k][None]) ** 2).sum(-1)).min(1)
                          for k in cells], 1)
    distances.sort(1)
    border = w0 * np.exp(-(distances[:, 0] + distances[:, 1]) ** 2 / (2 * sigma ** 2))
    background = labels.reshape(-1) == 0
    weights = np.where(background, class_weights[0], class_weights[1]) + np.where(background, border, 0)
    return weights.reshape(h, w)


def test_weight_map_matches_the_formula():
    labels = np.zeros((14, 16), dtype=np.int32)
    labels[2:6, 2:7] = 1
    labels[7:12, 4:8] = 2
    labels[3:9, 10:14] = 3
    expected = _brute_force_weight_map(labels, 10.0, 3.0, (0.5, 2.0))
    np.testing.assert_allclose(unet_weight_map(labels, w0=10, sigma=3, class_weights=(0.5, 2.0)), expected,
                               rtol=1e-6)


def test_weight_map_peaks_between_touching_cells_and_is_w_c_far_away():
    labels = np.zeros((64, 64), dtype=np.int64)
    labels[2:10, 2:8] = 1
    labels[2:10, 9:15] = 2  # one background column (x = 8) between the two cells
    weights = unet_weight_map(labels, w0=10, sigma=5)
    background = labels == 0
    w_background = labels.size / (2 * background.sum())
    w_cell = labels.size / (2 * (~background).sum())
    assert np.isclose(weights[~background], w_cell).all()
    gap = weights[2:10, 8]
    np.testing.assert_allclose(gap, w_background + 10 * np.exp(-(1 + 1) ** 2 / (2 * 25)), rtol=1e-6)
    assert weights[background].max() == pytest.approx(gap.max())  # the gap is the most stressed background
    assert (weights[40:, 40:] == np.float32(w_background)).all()  # the border term has vanished
    # balanced classes: both carry the same total weight
    assert (w_background * background.sum()) == pytest.approx(w_cell * (~background).sum())


def test_weight_map_of_one_cell_is_the_class_weights_and_tensors_stay_tensors():
    labels = torch.zeros(20, 20, dtype=torch.int64)
    labels[5:9, 5:9] = 7
    weights = unet_weight_map(labels, class_weights=(1.0, 3.0))
    assert isinstance(weights, torch.Tensor) and weights.dtype == torch.float32
    torch.testing.assert_close(weights, torch.where(labels == 0, 1.0, 3.0))
    with pytest.raises(TypeError, match="integer"):
        unet_weight_map(labels.float())


def test_weighted_cross_entropy():
    logits = torch.randn(2, 3, 5, 6, requires_grad=True)
    target = torch.randint(0, 3, (2, 5, 6))
    ones = torch.ones(5, 6)
    torch.testing.assert_close(weighted_cross_entropy(logits, target, ones), F.cross_entropy(logits, target))
    weights = torch.rand(2, 5, 6)
    manual = -(weights * F.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]).sum()
    loss = weighted_cross_entropy(logits, target, weights.numpy(), reduction="sum")
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert logits.grad is not None
    with pytest.raises(ValueError, match="weight_map"):
        weighted_cross_entropy(logits, target, torch.ones(4, 4))


# --------------------------------------------------------------------------------------------------------------
# elastic deformation
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [None, 3])
def test_elastic_deform_with_alpha_zero_is_the_identity(grid):
    image = torch.randn(2, 30, 41)
    mask = torch.randint(0, 5, (30, 41))
    warped, warped_mask = elastic_deform(image, mask, alpha=0.0, sigma=4.0, grid=grid)
    # grid_sample's normalised coordinates round-trip to pixel positions within a few float32 ulps of the image
    # size (align_corners=True: x = (u + 1) (W - 1) / 2), and bilinear sampling turns a position error into a
    # value error of at most that times the largest step between neighbouring pixels (seen: 1.0e-5)
    step = max(float(image.diff(dim=-1).abs().max()), float(image.diff(dim=-2).abs().max()))
    atol = 4 * torch.finfo(torch.float32).eps * max(image.shape[-2:]) * step
    torch.testing.assert_close(warped, image, atol=atol, rtol=0)
    assert torch.equal(warped_mask, mask)


@pytest.mark.parametrize("grid", [None, 3, (2, 4)])
def test_elastic_deform_keeps_labels_and_is_reproducible(grid):
    image = torch.randn(1, 48, 40)
    mask = torch.tensor([0, 3, 7], dtype=torch.uint8)[torch.randint(0, 3, (48, 40))]
    alpha = 34.0 if grid is None else 1.0
    sigma = 4.0 if grid is None else 10.0
    out = [elastic_deform(image, mask, alpha=alpha, sigma=sigma, grid=grid,
                          generator=torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)]
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert not torch.equal(out[0][0], out[2][0])
    assert out[0][1].dtype == torch.uint8
    assert set(out[0][1].unique().tolist()) <= {0, 3, 7}
    assert not torch.equal(out[0][1], mask)


def test_elastic_deform_moves_image_and_mask_together():
    # Bilinear resampling of a linear ramp is exact and nearest resampling rounds it: one shared field keeps
    # the deformed mask within half a pixel of the deformed image (away from the reflecting borders).
    width = 64
    ramp = torch.arange(width, dtype=torch.float64).expand(64, width)
    warped, warped_mask = elastic_deform(ramp, ramp.long(), alpha=1.0, sigma=2.0, grid=3,
                                         generator=torch.Generator().manual_seed(0))
    inner = (slice(12, -12), slice(12, -12))
    assert (warped[inner] - ramp[inner]).abs().max() > 0.5  # it did move
    assert (warped[inner] - warped_mask[inner].double()).abs().max() <= 0.5 + 1e-9


def test_elastic_deform_draws_one_field_per_sample():
    image = torch.randn(1, 1, 32, 32).expand(2, 1, 32, 32)
    warped = elastic_deform(image, alpha=1.0, sigma=5.0, grid=3)
    assert warped.shape == image.shape
    assert not torch.equal(warped[0], warped[1])


def test_elastic_deform_rejects_bad_inputs():
    with pytest.raises(TypeError, match="floating-point"):
        elastic_deform(torch.zeros(8, 8, dtype=torch.int64), alpha=1.0, sigma=1.0)
    with pytest.raises(ValueError, match="mask must have shape"):
        elastic_deform(torch.zeros(2, 8, 8), torch.zeros(2, 8, 8, dtype=torch.int64), alpha=1.0, sigma=1.0)
    with pytest.raises(ValueError, match="grid"):
        elastic_deform(torch.zeros(8, 8), alpha=1.0, sigma=1.0, grid=1)
