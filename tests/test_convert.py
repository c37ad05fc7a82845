"""fastseg.convert: optimize() swaps torch modules for fastseg's drop-ins without changing what the model computes.

Checked on small networks of the kinds our users run (a VGG-like conv-BN-ReLU stack with dilation and reflect
padding, a SegNet-like encoder-decoder with pooling indices, a ResNet trunk whose Bottleneck mirrors
torchvision's, torchvision's own models when torchvision is installed):
- the state_dict, parameter and buffer names stay the same; checkpoints load strictly both ways;
- eval outputs match; in training one step's output, loss gradients and BatchNorm running statistics match;
- the report says what was fused by which proof, and why modules were left;
- what cannot be proven (untraceable forwards, shared modules, calls from outside the parent, hooks,
  subclasses, unsupported groups) is left, with the reason;
- revert() gives the original torch modules back; inplace copies or not; meta device; torch.compile fullgraph;
  pickling; the Triton kernels under the interpreter.

On CPU the default backend runs the reference convolution and the C++ max-pool; one test runs the Triton
kernels through the interpreter (see conftest.py).
"""

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastseg
from conftest import DispatchedOps, skip_unless_backend
from fastseg.convert import ConversionReport, FoldedBatchNorm2d, FoldedReLU, FusedChainConv2d, optimize, revert

FASTSEG_CLASSES = (fastseg.nn.FusedConv2d, fastseg.nn.MaxPool2d, fastseg.nn.MaxUnpool2d, FoldedBatchNorm2d,
                   FoldedReLU)


# --------------------------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------------------------
def conv_stack():
    """VGG-BN-like: conv-BN-ReLU runs (one dilated, one with reflect padding), a conv-ReLU run, a pool."""
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.Conv2d(6, 5, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 4, 1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4),
    )


class SegNetLike(nn.Module):
    """Encoder-decoder with max-pooling indices carried to the unpooling (SegNet)."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.enc2 = nn.Sequential(nn.Conv2d(6, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.dec2 = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.dec1 = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        x, i1 = self.pool(self.enc1(x))
        size1 = x.shape[-2:]
        x, i2 = self.pool(self.enc2(x))
        x = self.dec2(self.unpool(x, i2, output_size=size1))
        x = self.dec1(self.unpool(x, i1))
        return self.classifier(x)


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck: one ReLU module called three times, a downsample Sequential."""

    def __init__(self, inplanes, width, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class MiniResNet(nn.Module):
    """torchvision's ResNet stem and first stage (the second block dilated, as DeepLab's), scaled down."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        downsample = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(Bottleneck(8, 4, downsample=downsample), Bottleneck(16, 4, dilation=2))

    def forward(self, x):
        return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))


NETWORKS = {"conv_stack": (conv_stack, (2, 3, 13, 11)), "segnet": (SegNetLike, (2, 3, 16, 12)),
            "resnet": (MiniResNet, (2, 3, 32, 24))}


def randomized(model):
    """Random BatchNorm statistics and affine parameters: folding them must matter to the output."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
    return model


def fastseg_modules(model):
    return [name for name, m in model.named_modules() if isinstance(m, FASTSEG_CLASSES)]


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def assert_outputs_close(got, expected, **tolerance):
    tolerance = tolerance or dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, **tolerance)


def check_train_step(original, optimized, x, dtype=torch.float64):
    """One training step in both, on copies in `dtype`: outputs, parameter gradients and updated BatchNorm
    statistics match (both forwards draw the same random numbers, so dropout drops the same elements).

    float64 by default: a gradient that is 0 in exact arithmetic (a convolution's bias before a training-mode
    BatchNorm) is rounding noise alone, summed in different orders by the fused and the plain backward, and in
    float32 that noise reached 4e-6 (conv_stack), past the tolerance below; in float64 it is ~1e-15, so the
    tolerances prove the same function."""
    original, optimized = (copy.deepcopy(model).to(dtype) for model in (original, optimized))
    x = x.to(dtype)
    outputs = []
    seed = int(torch.randint(2**31, ()))
    for model in (original, optimized):
        model.train()
        model.zero_grad()
        torch.manual_seed(seed)
        outputs.append(model(x))
        outputs[-1].square().mean().backward()
    assert_outputs_close(outputs[1], outputs[0])
    params = dict(original.named_parameters())
    for name, p in optimized.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    buffers = dict(original.named_buffers())
    for name, b in optimized.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=1e-6, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------------------
# the networks, end to end
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("network", list(NETWORKS))
def test_network_is_a_drop_in(network):
    make, shape = NETWORKS[network]
    original = randomized(make()).eval()
    optimized, report = optimize(original, report=True)
    assert isinstance(report, ConversionReport)
    assert fastseg_modules(original) == []
    assert len(fastseg_modules(optimized)) >= 3
    # names and values of every parameter, buffer and state_dict entry are the original's
    assert [n for n, _ in optimized.named_parameters()] == [n for n, _ in original.named_parameters()]
    assert [n for n, _ in optimized.named_buffers()] == [n for n, _ in original.named_buffers()]
    assert_same_state(optimized, original)

    x = torch.randn(shape)
    assert_outputs_close(optimized(x), original(x))
    check_train_step(original, optimized, x)
    original.eval()
    optimized.eval()
    assert_outputs_close(optimized(x), original(x))

    # checkpoints load strictly both ways
    fresh_original, fresh_optimized = randomized(make()).eval(), optimize(randomized(make())).eval()
    fresh_optimized.load_state_dict(original.state_dict(), strict=True)
    fresh_original.load_state_dict(optimized.state_dict(), strict=True)
    assert_outputs_close(fresh_optimized(x), original(x))
    assert_outputs_close(fresh_original(x), original(x))

    reverted = revert(optimized)
    assert fastseg_modules(reverted) == [] and fastseg_modules(optimized) != []
    assert [type(m) for m in reverted.modules()] == [type(m) for m in original.modules()]
    assert_same_state(reverted, original)
    torch.testing.assert_close(reverted(x), original(x), rtol=0, atol=0)


def test_report_says_what_was_fused_by_which_proof():
    model, report = optimize(MiniResNet(), report=True)
    fused = {d.path for d in report.decisions if d.action == "fused"}
    assert {"conv1", "bn1", "relu", "layer1.0.downsample.0", "layer1.0.downsample.1"} <= fused
    assert {f"layer1.{b}.{m}{i}" for b in (0, 1) for m in ("conv", "bn") for i in (1, 2, 3)} <= fused
    assert "torch.fx" in report["conv1"].detail and "nn.Sequential" in report["layer1.0.downsample.0"].detail
    # the Bottleneck's ReLU runs three times: left to run on its own, the BatchNorms before it still fold
    assert report["layer1.0.relu"].action == "left" and "called 3 times" in report["layer1.0.relu"].detail
    assert type(model.layer1[0].relu) is nn.ReLU and type(model.layer1[0].bn1) is FoldedBatchNorm2d
    assert type(model.relu) is FoldedReLU and type(model.conv1) is FusedChainConv2d
    assert report["maxpool"].action == "replaced" and type(model.maxpool) is fastseg.nn.MaxPool2d
    assert report.left == [d for d in report.decisions if d.action == "left"] and report.converted
    text = str(report)
    assert text.startswith("fastseg.optimize: ") and "layer1.0.bn3 [BatchNorm2d] fused" in text
    with pytest.raises(KeyError, match="no decision"):
        report["nowhere"]


def check_frozen_batchnorm_step(original, optimized, x, output=lambda y: y):
    """Fine-tuning with frozen (eval-mode) BatchNorms in both models: outputs and gradients match."""
    outputs = []
    for model in (original, optimized):
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        outputs.append(output(model(x)))
        outputs[-1].square().mean().backward()
    assert_outputs_close(outputs[1], outputs[0])
    params = dict(original.named_parameters())
    for name, p in optimized.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_frozen_batchnorm_fuses_during_training():
    """Fine-tuning with frozen (eval-mode) BatchNorms: the chains fold in training too, and gradients match."""
    original = randomized(MiniResNet())
    check_frozen_batchnorm_step(original, optimize(original), torch.randn(2, 3, 32, 24))


# --------------------------------------------------------------------------------------------------------------
# what is left, and why
# --------------------------------------------------------------------------------------------------------------
class StdConv2d(nn.Conv2d):
    """A Conv2d subclass with its own forward (weight standardisation, as in some segmentation encoders)."""

    def forward(self, x):
        mean, std = self.weight.mean((1, 2, 3), keepdim=True), self.weight.std((1, 2, 3), keepdim=True)
        return self._conv_forward(x, (self.weight - mean) / (std + 1e-5), self.bias)


def test_unsupported_modules_are_left_with_reasons():
    class PoolWithCount(nn.MaxPool2d):
        pass

    original = randomized(nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.BatchNorm2d(6),
        StdConv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6),
        nn.ConvTranspose2d(6, 4, 2, stride=2), PoolWithCount(2),
        nn.Conv2d(4, 5, 1), nn.SyncBatchNorm(5), nn.Conv2d(5, 4, 1), nn.BatchNorm2d(3),
    )).eval()
    optimized, report = optimize(original, report=True)
    assert "groups=2" in report["0"].detail and report["0"].action == "left"
    assert "its convolution '0' cannot carry it" in report["1"].detail
    assert "subclass of nn.Conv2d (StdConv2d)" in report["2"].detail
    assert "transposed convolution" in report["4"].detail
    assert "subclass of nn.MaxPool2d" in report["5"].detail
    assert report["6"].action == "replaced"
    assert "has 3 features, its convolution 4 outputs" in report["9"].detail
    assert [type(m) for m in optimized] == [type(m) for m in original[:6]] + [
        fastseg.nn.FusedConv2d, nn.SyncBatchNorm, fastseg.nn.FusedConv2d, nn.BatchNorm2d]
    x = torch.randn(2, 4, 6, 6)
    assert_outputs_close(optimized[:7](x), original[:7](x))

    # converting again changes nothing and says why
    again, second = optimize(optimized, report=True)
    assert [type(m) for m in again] == [type(m) for m in optimized]
    assert second["6"].detail == "already a fastseg module" and second["6"].action == "left"


def test_untraceable_forward_and_module_list_prove_nothing():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.branches = nn.ModuleList([nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)])

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            x = self.bn(self.conv(x))
            return self.branches[1](self.branches[0](x))

    original = randomized(DataDependent()).eval()
    optimized, report = optimize(original, report=True)
    assert type(optimized.conv) is fastseg.nn.FusedConv2d and type(optimized.bn) is nn.BatchNorm2d
    assert "torch.fx cannot trace the forward of the model (DataDependent)" in report["bn"].detail
    assert "has no forward of its own" in report["branches.1"].detail
    x = torch.randn(2, 3, 8, 8)
    assert_outputs_close(optimized(x), original(x))


def test_shared_modules_and_calls_from_outside_the_parent_are_not_fused():
    shared_conv = nn.Conv2d(4, 4, 3, padding=1)
    relu = nn.ReLU()

    class Outside(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(shared_conv, nn.BatchNorm2d(4), relu)
            self.b = nn.Sequential(shared_conv, nn.BatchNorm2d(4))
            self.c = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), relu, nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            x = self.b(self.a(x))
            # the BatchNorm c.1 is also called here, on another input: c's chain would fold it wrongly
            return self.c(x) + self.c[1](x)

    original = randomized(Outside()).eval()
    optimized, report = optimize(original, report=True)
    assert optimized.a[0] is optimized.b[0] and type(optimized.a[0]) is fastseg.nn.FusedConv2d
    assert "registered in 2 places" in report["a.1"].detail
    assert "called 2 times" in report["c.1"].detail and type(optimized.c[1]) is nn.BatchNorm2d
    # the ReLU shared by a and c stays an nn.ReLU; c.3 -> c.4 does not involve c's shared or twice-called modules
    assert type(optimized.c[3]) is FusedChainConv2d and type(optimized.c[2]) is nn.ReLU
    x = torch.randn(2, 4, 6, 6)
    assert_outputs_close(optimized(x), original(x))


def test_hooks_and_buffers_survive():
    original = randomized(conv_stack()).eval()
    original[0].register_buffer("extra", torch.randn(3))
    seen = []
    original[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    optimized, report = optimize(original, report=True)
    # the hooked conv runs alone (its hook sees the conv's own output); the chains without hooks still fuse
    assert type(optimized[0]) is fastseg.nn.FusedConv2d and "hooks" in report["1"].detail
    assert type(optimized[3]) is FusedChainConv2d
    assert_same_state(optimized, original)
    assert "0.extra" in optimized.state_dict()
    x = torch.randn(2, 3, 9, 9)
    assert_outputs_close(optimized(x), original(x))
    assert seen == [(2, 6, 9, 9)] * 2


# --------------------------------------------------------------------------------------------------------------
# the API: errors, copies, devices, compile, pickling
# --------------------------------------------------------------------------------------------------------------
def test_non_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"fastseg.optimize: expected a torch.nn.Module, but got dict"):
        optimize({"conv": nn.Conv2d(1, 1, 1)})
    with pytest.raises(TypeError, match=r"fastseg.revert: expected a torch.nn.Module, but got Tensor"):
        revert(torch.zeros(1))


def test_inplace_shares_parameters_only_when_asked():
    original = conv_stack()
    copied = optimize(original)
    assert copied is not original and fastseg_modules(original) == []
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copied.parameters(), original.parameters()))
    params = list(original.parameters())
    first = original[0]
    same = optimize(original, inplace=True)
    assert same is original and same[0] is first and type(first) is FusedChainConv2d
    assert all(a is b for a, b in zip(same.parameters(), params))
    assert revert(same, inplace=True) is original and type(first) is nn.Conv2d and "_chain" not in vars(first)


def test_meta_device_model_converts_and_materializes():
    with torch.device("meta"):
        on_meta = MiniResNet()
    optimized = optimize(on_meta)
    assert optimized(torch.empty(2, 3, 32, 24, device="meta")).shape == (2, 16, 8, 6)
    reference = randomized(MiniResNet()).eval()
    optimized.to_empty(device="cpu").load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 24)
    assert_outputs_close(optimized.eval()(x), reference(x))


def test_compile_fullgraph():
    """Eval mode, where the chains fold: one graph through the fused ops, with their backward."""
    original = randomized(SegNetLike()).eval()
    optimized = optimize(original)
    compiled = torch.compile(optimized, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8)
    got = compiled(x)
    got.square().mean().backward()
    expected = original(x)
    expected.square().mean().backward()
    assert_outputs_close(got, expected)
    params = dict(original.named_parameters())
    for name, p in optimized.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_fullgraph_inference():
    """Eval mode under no_grad, where eager calls reuse weights folded ahead: traced, the fold is part of the
    graph instead (no graph break on the kept copy), with the same outputs."""
    original = randomized(MiniResNet()).eval()
    optimized = optimize(original)
    x = torch.randn(2, 3, 16, 12)
    with torch.no_grad():
        expected = original(x)
        eager = optimized(x)  # keeps the folded weights
        compiled = torch.compile(optimized, fullgraph=True, backend="aot_eager")
        assert_outputs_close(compiled(x), expected)
    assert_outputs_close(eager, expected)


def test_optimized_model_pickles_and_deep_copies():
    optimized = optimize(randomized(MiniResNet())).eval()
    buffer = io.BytesIO()
    torch.save(optimized, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(optimized)
    x = torch.randn(1, 3, 16, 16)
    for clone in (loaded, copied):
        # the chain inside each convolution points at the clone's own modules
        assert clone.conv1._chain.conv is clone.conv1 and clone.conv1._chain.bn is clone.bn1
        assert clone.relu._chain_bn is clone.bn1
        assert_outputs_close(clone(x), optimized(x), rtol=0, atol=0)


def test_data_parallel_copies_run_unfused():
    """nn.DataParallel replicates with _replicate_for_data_parallel (on GPUs): a chain's copies are plain modules."""
    optimized = optimize(randomized(MiniResNet())).eval()
    conv, bn, relu = (m._replicate_for_data_parallel() for m in (optimized.conv1, optimized.bn1, optimized.relu))
    assert (type(conv), type(bn), type(relu)) == (fastseg.nn.FusedConv2d, nn.BatchNorm2d, nn.ReLU)
    assert "_chain" not in vars(conv) and "_chain_bn" not in vars(relu)
    assert type(optimized.conv1) is FusedChainConv2d and "_chain" in vars(optimized.conv1)
    x = torch.randn(1, 3, 16, 16)
    conv._parameters, bn._parameters = optimized.conv1._parameters, optimized.bn1._parameters
    assert_outputs_close(relu(bn(conv(x))), optimized.relu(optimized.bn1(optimized.conv1(x))))


# --------------------------------------------------------------------------------------------------------------
# residual blocks of known classes: the last conv -> BN -> (+ shortcut) -> ReLU in one kernel
# --------------------------------------------------------------------------------------------------------------
def dilated_resnet():
    """fastseg's own ResNet trunk (its Bottleneck), small, at output stride 8 as in DeepLab."""
    from fastseg.models.backbones import ResNet

    return randomized(ResNet([2, 1, 1, 1], base_width=8, replace_stride_with_dilation=(False, True, True)))


def test_residual_blocks_fuse_their_tail_with_the_shortcut():
    original = dilated_resnet().eval()
    optimized, report = optimize(original, report=True)
    blocks = [name for name, m in original.named_modules() if type(m).__name__ == "Bottleneck"]
    assert len(blocks) == 5
    for name in blocks:
        block = optimized.get_submodule(name)
        assert type(block).__name__ == "FusedBottleneck" and report[name].action == "fused"
        assert "(+ shortcut)" in report[name].detail and "known exactly" in report[name].detail
        assert type(block.conv3) is fastseg.nn.FusedConv2d and type(block.bn3) is nn.BatchNorm2d
        assert {report[f"{name}.{m}"].action for m in ("conv3", "bn3", "relu3")} == {"fused"}
        assert block._residual_chain.conv is block.conv3 and block._residual_chain.bn is block.bn3
        assert type(block.conv1) is FusedChainConv2d  # the first two conv-BN-ReLU chains fuse as before
    assert_same_state(optimized, original)
    x = torch.randn(2, 3, 40, 32)
    with torch.no_grad():
        assert_outputs_close(optimized(x)["out"], original(x)["out"])
    check_train_step(_OutTensor(original), _OutTensor(optimized), x)
    # a block (its weights folded by an earlier call) is four fused ops: no sum, no ReLU, no BatchNorm of its own
    block_input = torch.randn(1, 32, 10, 8)
    with torch.no_grad():
        optimized.layer2[0](block_input)
        with DispatchedOps() as ops:
            optimized.layer2[0](block_input)
    assert ops.names == ["fastseg.fused_conv2d.default"] * 4, ops.names
    reverted = revert(optimized)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in original.modules()]
    assert not any("_residual_chain" in vars(m) for m in reverted.modules())
    again, report = optimize(optimized, report=True)  # an optimized model is left as it is
    assert report["layer1.0"].action == "left" and "already a fastseg module" in report["layer1.0"].detail


class _OutTensor(nn.Module):
    """A ResNet trunk's {"out": tensor} as a tensor (check_train_step takes tensors)."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk

    def forward(self, x):
        return self.trunk(x)["out"]


def test_residual_blocks_frozen_batchnorm_training_and_copies():
    """Fine-tuning with frozen BatchNorms runs the residual kernel with autograd (gradients reach the shortcut
    and both branches); pickles, deep copies and DataParallel replicas keep or drop the fused tail correctly."""
    original = dilated_resnet()
    optimized = optimize(original)
    x = torch.randn(2, 3, 32, 24)
    check_frozen_batchnorm_step(original, optimized, x, output=lambda y: y["out"])
    optimized.eval()
    buffer = io.BytesIO()
    torch.save(optimized, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(optimized)):
        block = clone.layer1[0]
        assert block._residual_chain.conv is block.conv3 and block._residual_chain.act is block.relu3
        with torch.no_grad():
            assert_outputs_close(clone(x)["out"], optimized(x)["out"], rtol=0, atol=0)
    replica = optimized.layer1[0]._replicate_for_data_parallel()
    assert type(replica).__name__ == "Bottleneck" and "_residual_chain" not in vars(replica)


def test_residual_blocks_with_hooks_or_odd_tails_are_left():
    model = dilated_resnet().eval()
    model.layer1[0].register_forward_hook(lambda *args: None)
    model.layer1[1].bn3.register_forward_pre_hook(lambda *args: None)
    model.layer2[0].relu3 = nn.ReLU6()
    optimized, report = optimize(model, report=True)
    assert report["layer1.0"].action == "left" and "hooks" in report["layer1.0"].detail
    assert report["layer1.1"].action == "left" and "bn3 has forward or backward hooks" in report["layer1.1"].detail
    assert report["layer2.0"].action == "left" and "relu3 is a ReLU6" in report["layer2.0"].detail
    assert report["layer3.0"].action == "fused"
    x = torch.randn(1, 3, 32, 24)
    with torch.no_grad():
        assert_outputs_close(optimized(x)["out"], model(x)["out"])


def test_residual_blocks_compile_fullgraph():
    original = dilated_resnet().eval()
    optimized = optimize(original)
    x = torch.randn(1, 3, 32, 24)
    with torch.no_grad():
        compiled = torch.compile(optimized, fullgraph=True, backend="aot_eager")
        assert_outputs_close(compiled(x)["out"], original(x)["out"])


# --------------------------------------------------------------------------------------------------------------
# the Triton kernels (interpreter on CPU) and torchvision's models
# --------------------------------------------------------------------------------------------------------------
def test_triton_kernels_run_the_optimized_model():
    skip_unless_backend("triton")
    original = randomized(SegNetLike())
    optimized = optimize(original)
    x = torch.randn(1, 3, 8, 4)
    original.eval()
    optimized.eval()
    with fastseg.backend("triton"):
        assert_outputs_close(optimized(x), original(x))
        check_train_step(original, optimized, x, torch.float32)  # the Triton kernels' dtype under the interpreter


@pytest.mark.parametrize("name", ["resnet18", "fcn_resnet50", "deeplabv3_resnet50"])
def test_torchvision_models(name):
    models = pytest.importorskip("torchvision.models")
    segmentation = name != "resnet18"
    builder = getattr(models.segmentation if segmentation else models, name)
    kwargs = dict(weights=None, weights_backbone=None, num_classes=3) if segmentation else dict(weights=None)
    original = randomized(builder(**kwargs)).eval()
    optimized, report = optimize(original, report=True)
    prefix = "backbone." if segmentation else ""
    assert report[f"{prefix}layer1.0.bn1"].action == "fused"
    # their residual blocks (BasicBlock in ResNet-18, Bottleneck in the others) fuse their tails
    block = report[f"{prefix}layer1.0"]
    assert block.action == "fused" and block.detail.startswith("FusedTorchvision"), block
    assert_same_state(optimized, original)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got, expected = optimized(x), original(x)
    if segmentation:
        got, expected = got["out"], expected["out"]
    assert_outputs_close(got, expected, rtol=1e-4, atol=1e-4)
    if not segmentation:
        check_train_step(original, optimized, torch.randn(2, 3, 32, 32))
    reverted = revert(optimized)
    assert fastseg_modules(reverted) == []
    assert [type(m) for m in reverted.modules()] == [type(m) for m in original.modules()]


UNPICKLE = r"""
import sys, torch
model, x, expected = torch.load(sys.argv[1], weights_only=False)
assert type(model.layer1[0]).__name__ == "FusedTorchvisionBasicBlock", type(model.layer1[0])
with torch.no_grad():
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
print("ok")
"""


def test_torchvision_model_unpickles_in_a_fresh_process(tmp_path):
    """A saved optimized torchvision model names its fused block classes, which fastseg.convert makes on demand
    in a process that has not optimized anything."""
    models = pytest.importorskip("torchvision.models")
    optimized = optimize(randomized(models.resnet18(weights=None))).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.save((optimized, x, optimized(x)), tmp_path / "model.pt")
    script = tmp_path / "load.py"
    script.write_text(UNPICKLE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(fastseg.__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "model.pt")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "unet", "segnet"])
def test_gpu_optimized_networks_match_eager(name, dtype):
    """On CUDA in half precision, channels_last, eval under no_grad (the bench's inference setting: "auto" picks
    per layer among the Triton kernel and cuDNN with one epilogue pass; residual blocks fused): the optimized
    network's scores match eager's within the bench's tolerance, twice (the second call reuses what the first
    timed, compiled and folded)."""
    from fastseg.bench.models import check_outputs

    kwargs = dict(num_classes=5, in_channels=3, base_width=16)
    if name == "unet":
        kwargs.update(padding=True)
    original = randomized(fastseg.models.get_model(name, **kwargs)).cuda().to(dtype)
    original = original.to(memory_format=torch.channels_last).eval()
    optimized = optimize(original)
    x = torch.randn(2, 3, 96, 96, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = original(x)
        expected = expected["out"] if isinstance(expected, dict) else expected
        for _ in range(2):
            got = optimized(x)
            check_outputs(expected, got["out"] if isinstance(got, dict) else got, dtype)


@pytest.mark.parametrize("architecture", ["Unet", "DeepLabV3Plus", "FPN"])
def test_segmentation_models_pytorch(architecture):
    """segmentation_models_pytorch's networks (ResNet-18 encoder, no pretrained weights: nothing downloaded): the
    converter fuses their conv-BN-ReLU chains and leaves the ReLUs their residual blocks call twice; outputs in
    eval mode, and one training step's outputs, gradients and BatchNorm statistics, match the original's."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    original = randomized(getattr(smp, architecture)(encoder_name="resnet18", encoder_weights=None, classes=3))
    optimized, report = optimize(original.eval(), report=True)
    assert len(report.converted) >= 20
    assert report["encoder.layer1.0.relu"].action == "left"
    assert_same_state(optimized, original)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_outputs_close(optimized(x), original(x), rtol=1e-4, atol=1e-4)
    check_train_step(original, optimized, x)
    assert fastseg_modules(revert(optimized)) == []
