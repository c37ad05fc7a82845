"""The drop-in converter: ``optimize(model)`` runs a PyTorch model on fastseg's kernels, ``revert(model)`` undoes it.

What ``optimize`` changes, in any nn.Module tree (fastseg's reference networks, torchvision's,
segmentation_models_pytorch's, your own):

- every ``nn.Conv2d`` (that class exactly; groups 1 or depthwise) becomes a ``fastseg.nn.FusedConv2d``;
- every ``nn.MaxPool2d`` / ``nn.MaxUnpool2d`` (exactly) becomes ``fastseg.nn.MaxPool2d`` / ``MaxUnpool2d``;
- a chain ``Conv2d -> BatchNorm2d -> ReLU`` (or ``Conv2d -> BatchNorm2d``, or ``Conv2d -> ReLU``) that it can
  prove runs in that order, each module's output going to the next one only, is fused: the convolution becomes
  a ``FusedChainConv2d``, which computes the whole chain in one kernel through a ``fastseg.nn.ConvBNAct`` over
  the chain's modules whenever the BatchNorm is a fixed affine map (eval mode with running statistics, or no
  BatchNorm), and the ``FoldedBatchNorm2d`` / ``FoldedReLU`` after it then pass their input through. With the
  BatchNorm computing batch statistics (training) the three run one after the other as before, so batch and
  running statistics are exactly nn.BatchNorm2d's. A model with frozen (eval-mode) BatchNorms fuses in training
  too;
- a residual block of a class whose forward fastseg knows exactly (fastseg.models' Bottleneck; torchvision's
  Bottleneck and BasicBlock, which segmentation_models_pytorch's ResNet encoders use too) becomes its fused
  subclass: the block's last conv -> BatchNorm -> (+ shortcut) -> ReLU runs as one kernel with the shortcut as the
  residual (the sum and the ReLU sit in the block's own forward, which swapping its children cannot reach), the
  rest of its forward unchanged. Its tail must be plain torch modules used there alone, without hooks, and the
  block without hooks; the report says why a block was left.

How a module is swapped: its class is changed in place (``module.__class__ = FusedConv2d``, as
torch.nn.utils.parametrize does). Every drop-in is a subclass of the torch class it replaces and adds no
parameters or buffers, so the module keeps its identity, parameters, buffers, hooks and attributes: the
state_dict keys and values, named_parameters(), named_buffers() and every reference to the module (an optimizer,
another attribute that holds it) are exactly the original's. A checkpoint saved from the original loads into the
optimized model with strict=True and the other way round. (fastseg.nn.ConvBNAct itself cannot stand in a
chain's place: its submodules ``conv``/``bn``/``act`` would rename the keys, ``seq.0.weight`` becoming
``seq.0.conv.weight``. So the chain's ConvBNAct is held by the convolution outside the module tree, and the
BatchNorm keeps its parameters and buffers under its own name.)

How the order of a chain is proven. A module's place in the tree says nothing about when it runs; its parent's
forward decides. So:

- in an ``nn.Sequential`` (or a subclass that keeps Sequential's forward), consecutive children run in order,
  each taking the previous one's output: that is the forward;
- for any other parent, its forward is traced with torch.fx (every submodule call recorded as one node, nothing
  traced into), once in training and once in eval mode: a chain needs the convolution's only user to be the
  BatchNorm (the BatchNorm's only user the ReLU), called on that output alone, in both traces. This finds
  torchvision's ResNet blocks (``conv1 -> bn1``; their ``relu`` is called several times, so it is not fused and
  keeps running on its own). A forward that torch.fx cannot trace (data-dependent control flow, calls of
  modules outside the tree) proves nothing: its convolutions become FusedConv2d alone, and the report says why
  its BatchNorms were left.

Besides, each module of a chain must be registered in one place of the tree, be called exactly once by the
forwards seen (a traced forward that calls a module of another parent counts), be of the torch class exactly
(a subclass may change forward) and have no forward or backward hooks (they would see the fused values).
What cannot be seen: code that calls a module directly from outside its parent's forward in a forward that
torch.fx could not trace, or Python control flow that takes another branch later than while tracing. Slicing an
optimized nn.Sequential between a chain's modules splits the chain; convert after the model is assembled.
nn.DataParallel's per-GPU copies cannot keep a chain's references to its other modules, so they run unfused
(FusedConv2d, BatchNorm2d, ReLU); DistributedDataParallel, which does not copy modules, runs the chains.

A FusedConv2d alone computes the same function as the nn.Conv2d it was, whoever calls it, so every nn.Conv2d of
a supported kind is swapped, also where no chain is proven. Modules of fastseg's own (ConvBNAct, DenseCRF, the
drop-ins) are left as they are, and optimize does not look inside them.

Reporting: ``optimize(model, report=True)`` returns ``(model, ConversionReport)``: one ``Decision`` per
convolution, BatchNorm2d, pooling, unpooling and fastseg module, and per ReLU that a chain fused or could not take,
saying what it became (and, for a chain, by which proof), or why it was left. ``print(report)`` lists them.
"""

from __future__ import annotations

import copy
import sys
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from fastseg.nn.conv import ConvBNAct, FusedConv2d
from fastseg.nn.crf import DenseCRF
from fastseg.nn.pooling import MaxPool2d, MaxUnpool2d

__all__ = ["ConversionReport", "Decision", "FoldedBatchNorm2d", "FoldedReLU", "FusedChainConv2d", "optimize",
           "revert"]


# --- the chain's modules ------------------------------------------------------------------------------------


def _folds(bn: nn.BatchNorm2d | None) -> bool:
    """Whether a chain with this BatchNorm (None: no BatchNorm) runs as one kernel now: the BatchNorm is a fixed
    per-channel affine map (eval mode with running statistics), as fastseg.nn.ConvBNAct folds it."""
    return bn is None or (not bn.training and bn.running_mean is not None)


class _ChainMember:
    """A module of a fused chain. nn.DataParallel copies every module for each GPU on every forward, and a copy's
    references to the rest of its chain would still point at the originals (on the first GPU): its copies are
    the unfused modules instead, which compute the same function."""

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        _retype(replica, _UNFUSED_CLASS[type(self)])
        return replica


class FusedChainConv2d(_ChainMember, FusedConv2d):
    """The convolution of a proven chain conv -> BatchNorm2d -> ReLU (BatchNorm or ReLU may be absent).

    When the chain folds (see the module doc) it returns relu(bn(conv(x))) from one fused kernel, computed by the
    fastseg.nn.ConvBNAct in ``self._chain`` (kept outside the module tree, so that no state_dict key changes);
    the FoldedBatchNorm2d and FoldedReLU after it pass that through. Otherwise it is a FusedConv2d.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        chain = self._chain
        if _folds(chain.bn):
            return chain(input)
        return super().forward(input)

    def extra_repr(self) -> str:
        fused = [type(m).__name__ for m in (self._chain.bn, self._chain.act)
                 if m is not None and not isinstance(m, nn.Identity)]
        return f"{super().extra_repr()}, fused with the following {' and '.join(fused)}"


class FoldedBatchNorm2d(_ChainMember, nn.BatchNorm2d):
    """An nn.BatchNorm2d after a FusedChainConv2d: the identity while that convolution applies it (eval mode with
    running statistics), nn.BatchNorm2d otherwise. Same parameters, buffers and state_dict."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _folds(self):
            return input
        return super().forward(input)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, folded into the preceding convolution in eval mode"


class FoldedReLU(_ChainMember, nn.ReLU):
    """An nn.ReLU ending a chain: the identity while the chain's convolution applies it, nn.ReLU otherwise.

    ``self._chain_bn`` is the chain's FoldedBatchNorm2d (None for conv -> ReLU), which decides whether it folds.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _folds(self._chain_bn):
            return input
        return super().forward(input)

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [super().extra_repr(), "folded into the preceding convolution"]))


# Attributes a chain's modules hold outside the module tree (set with _set_hidden).
_HIDDEN_ATTRIBUTES = ("_chain", "_chain_bn", "_residual_chain")
_UNFUSED_CLASS = {FusedChainConv2d: FusedConv2d, FoldedBatchNorm2d: nn.BatchNorm2d, FoldedReLU: nn.ReLU}


def _set_hidden(module: nn.Module, name: str, value) -> None:
    """An attribute that nn.Module does not register (a module stored here is not a submodule: no state_dict key,
    not visited by .to()/.train(); the module it points to is in the tree, where those reach it)."""
    module.__dict__[name] = value


def _retype(module: nn.Module, cls: type) -> None:
    """module becomes a cls (a class it shares its state layout with), without a chain's hidden attributes."""
    for name in _HIDDEN_ATTRIBUTES:
        module.__dict__.pop(name, None)
    module.__class__ = cls


def _fuse_chain(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: nn.ReLU | None) -> None:
    if bn is not None:
        bn.__class__ = FoldedBatchNorm2d
    if relu is not None:
        relu.__class__ = FoldedReLU
        _set_hidden(relu, "_chain_bn", bn)
    conv.__class__ = FusedChainConv2d
    _set_hidden(conv, "_chain", ConvBNAct.from_modules(conv, bn, relu))


# Each drop-in and the class it came from (revert's map; the residual blocks below add theirs); optimize swaps
# only these torch classes exactly.
_TORCH_CLASS = {FusedChainConv2d: nn.Conv2d, FusedConv2d: nn.Conv2d, FoldedBatchNorm2d: nn.BatchNorm2d,
                FoldedReLU: nn.ReLU, MaxPool2d: nn.MaxPool2d, MaxUnpool2d: nn.MaxUnpool2d}
_DROP_IN = {nn.Conv2d: FusedConv2d, nn.MaxPool2d: MaxPool2d, nn.MaxUnpool2d: MaxUnpool2d}


# --- residual blocks ---------------------------------------------------------------------------------------------
#
# A ResNet block ends in conv -> BatchNorm -> (+ shortcut) -> ReLU, the sum and the ReLU in its forward's own code,
# which swapping modules cannot reach: eagerly they are two more passes over the block's output. For the block
# classes whose forward fastseg knows exactly (its own backbone's Bottleneck; torchvision's Bottleneck and
# BasicBlock, which segmentation_models_pytorch's ResNet encoders use too), optimize swaps the block itself for a
# subclass whose forward is the original's with that tail computed by one fastseg.nn.ConvBNAct, the shortcut as
# its residual: one kernel in eval mode, the original's modules one after the other in training.


class _FusedResidualBlock(_ChainMember):
    """The part every fused residual block shares: self._residual_chain, a ConvBNAct over the block's last
    convolution, BatchNorm and ReLU (held outside the module tree: no state_dict key changes), and TAIL, the
    names of those three attributes."""

    TAIL: tuple[str, str, str]

    def extra_repr(self) -> str:
        conv, bn, relu = self.TAIL
        return f"{conv} -> {bn} -> (+ shortcut) -> {relu} fused in one kernel"


def _fastseg_blocks() -> dict[type, type]:
    from fastseg.models import backbones

    class FusedBottleneck(_FusedResidualBlock, backbones.Bottleneck):
        """fastseg.models.backbones.Bottleneck with conv3 -> bn3 -> (+ shortcut) -> relu3 in one kernel."""

        TAIL = ("conv3", "bn3", "relu3")

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu1(self.bn1(self.conv1(x)))
            out = self.relu2(self.bn2(self.conv2(out)))
            return self._residual_chain(out, identity)

    return {backbones.Bottleneck: FusedBottleneck}


def _torchvision_blocks(resnet) -> dict[type, type]:
    class FusedTorchvisionBottleneck(_FusedResidualBlock, resnet.Bottleneck):
        """torchvision's Bottleneck with conv3 -> bn3 -> (+ shortcut) -> relu in one kernel (the same ReLU module
        runs the first two on its own, as before)."""

        TAIL = ("conv3", "bn3", "relu")

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            identity = x if self.downsample is None else self.downsample(x)
            return self._residual_chain(out, identity)

    class FusedTorchvisionBasicBlock(_FusedResidualBlock, resnet.BasicBlock):
        """torchvision's BasicBlock with conv2 -> bn2 -> (+ shortcut) -> relu in one kernel."""

        TAIL = ("conv2", "bn2", "relu")

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            identity = x if self.downsample is None else self.downsample(x)
            return self._residual_chain(out, identity)

    return {resnet.Bottleneck: FusedTorchvisionBottleneck, resnet.BasicBlock: FusedTorchvisionBasicBlock}


_RESIDUAL_BLOCKS: dict[type, type] = {}  # block class -> its fused subclass (see _residual_block_classes)


def _register_blocks(blocks: dict[type, type]) -> None:
    for block, fused in blocks.items():
        fused.__module__, fused.__qualname__ = __name__, fused.__name__  # pickles find it here (__getattr__)
        _RESIDUAL_BLOCKS[block] = fused
        _TORCH_CLASS[fused] = _UNFUSED_CLASS[fused] = block


def _residual_block_classes() -> dict[type, type]:
    """The block classes optimize fuses, each with its fused subclass, made once per class: fastseg's, and
    torchvision's once torchvision.models.resnet is imported (a model holding its blocks has imported it)."""
    from fastseg.models import backbones

    if backbones.Bottleneck not in _RESIDUAL_BLOCKS:
        _register_blocks(_fastseg_blocks())
    resnet = sys.modules.get("torchvision.models.resnet")
    if resnet is not None and resnet.Bottleneck not in _RESIDUAL_BLOCKS:
        _register_blocks(_torchvision_blocks(resnet))
    return _RESIDUAL_BLOCKS


_FUSED_BLOCK_NAMES = ("FusedBottleneck", "FusedTorchvisionBottleneck", "FusedTorchvisionBasicBlock")


def __getattr__(name: str):
    """The fused residual block classes, made on first use (an unpickled model asks for them by name)."""
    if name in _FUSED_BLOCK_NAMES:
        if "Torchvision" in name:
            import torchvision.models.resnet  # noqa: F401 (what _residual_block_classes looks for)
        for fused in _residual_block_classes().values():
            if fused.__name__ == name:
                return fused
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fuse_residual_block(block: nn.Module, fused: type) -> None:
    conv, bn, relu = (getattr(block, name) for name in fused.TAIL)
    conv.__class__ = FusedConv2d
    block.__class__ = fused
    _set_hidden(block, "_residual_chain", ConvBNAct.from_modules(conv, bn, relu))


# fastseg modules optimize leaves alone and does not look into.
_FASTSEG_MODULES = (*_TORCH_CLASS, _FusedResidualBlock, ConvBNAct, DenseCRF)


# --- the report ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What optimize() did with one module.

    path: where it is registered in the model ("" for the model itself; the first path if it is registered in
    several places). kind: its class name before the conversion. action: "fused" (part of a chain), "replaced"
    (swapped for a fastseg drop-in) or "left". detail: what it became and with which modules, or why it was left.
    """

    path: str
    kind: str
    action: str
    detail: str


@dataclass(frozen=True)
class ConversionReport:
    """optimize()'s decisions, in the model's module order."""

    decisions: tuple[Decision, ...]

    @property
    def converted(self) -> list[Decision]:
        return [d for d in self.decisions if d.action != "left"]

    @property
    def left(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "left"]

    def __getitem__(self, path: str) -> Decision:
        for decision in self.decisions:
            if decision.path == path:
                return decision
        raise KeyError(f"ConversionReport: no decision for module path {path!r}")

    def __str__(self) -> str:
        counts = Counter(d.action for d in self.decisions)
        lines = [f"fastseg.optimize: {counts['fused']} fused, {counts['replaced']} replaced, {counts['left']} left"]
        lines += [f"  {d.path or '(model)'} [{d.kind}] {d.action}: {d.detail}" for d in self.decisions]
        return "\n".join(lines)


# --- what the tree and the forwards prove -----------------------------------------------------------------------


class _ChildCallTracer(torch.fx.Tracer):
    """Traces one module's own forward: each submodule call is one call_module node, never traced into."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _trace(parent: nn.Module) -> list[torch.fx.Graph]:
    """parent's forward traced in training and in eval mode (only parent's own flag changes, then is restored)."""
    was_training = parent.training
    try:
        graphs = []
        for training in (True, False):
            parent.training = training
            graphs.append(_ChildCallTracer().trace(parent))
        return graphs
    finally:
        parent.training = was_training


def _runs_sequentially(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


class _Analysis:
    """The model's tree and what its parents' forwards prove about the order of their children's calls."""

    def __init__(self, model: nn.Module):
        self.paths: dict[int, str] = {id(model): ""}      # module id -> first path
        self.modules: list[nn.Module] = [model]           # each module once, in tree order
        self.registrations: Counter[int] = Counter()      # module id -> number of (parent, name) registrations
        self._walk(model)
        self.calls: Counter[int] = Counter()              # module id -> calls seen in the forwards looked at
        self.unproven: dict[int, str] = {}                # module id -> why its calls are unknown
        self.successor: dict[int, nn.Module] = {}         # module id -> the sibling that alone takes its output
        self.predecessor: dict[int, nn.Module] = {}       # module id -> the sibling whose output it alone takes
        self.prover: dict[int, str] = {}                  # module id -> how its successor was proven
        for parent in self.modules:
            if parent._modules and not isinstance(parent, _FASTSEG_MODULES):
                self._read_forward(parent)

    def _walk(self, parent: nn.Module) -> None:
        """Pre-order: every module once, under its first path; fastseg modules are not looked into."""
        if isinstance(parent, _FASTSEG_MODULES):
            return
        for name, child in parent._modules.items():
            if child is None:
                continue
            self.registrations[id(child)] += 1
            if id(child) not in self.paths:
                prefix = self.paths[id(parent)]
                self.paths[id(child)] = f"{prefix}.{name}" if prefix else name
                self.modules.append(child)
                self._walk(child)

    def path(self, module: nn.Module) -> str:
        return self.paths[id(module)]

    def _read_forward(self, parent: nn.Module) -> None:
        children = [c for c in parent._modules.values() if c is not None]
        where = f"{self.path(parent)!r} ({type(parent).__name__})" if self.path(parent) else (
            f"the model ({type(parent).__name__})")
        if _runs_sequentially(parent):
            for child in children:
                self.calls[id(child)] += 1
            for child, following in zip(children, children[1:]):
                self._link(child, following, f"{where} is an nn.Sequential: its children run in sequence")
            return
        if not _has_forward(parent):
            for child in children:
                self.unproven.setdefault(id(child), f"its parent {where} has no forward of its own: which code "
                                                    "calls it, in which order, is unknown")
            return
        try:
            graphs = _trace(parent)
        except Exception as error:  # any failure of tracing user code means: nothing proven
            for child in children:
                self.unproven.setdefault(
                    id(child), f"order unproven: torch.fx cannot trace the forward of {where} ({_first_line(error)})")
            return
        (train_calls, train_links), (eval_calls, eval_links) = [
            self._read_graph(parent, graph) for graph in graphs]
        for key in train_calls.keys() | eval_calls.keys():
            self.calls[key] += max(train_calls[key], eval_calls[key])
        for key, link in train_links.items():
            if eval_links.get(key, (None, None))[1] is link[1]:
                self._link(*link, f"torch.fx traces of the forward of {where}")

    def _link(self, module: nn.Module, following: nn.Module, proof: str) -> None:
        self.successor[id(module)] = following
        self.predecessor[id(following)] = module
        self.prover[id(module)] = proof

    @staticmethod
    def _read_graph(parent: nn.Module, graph: torch.fx.Graph):
        """(calls per module id, child id -> (child, the child that alone consumes its output, on it alone))."""
        calls: Counter[int] = Counter()
        links: dict[int, tuple[nn.Module, nn.Module]] = {}
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            module = parent.get_submodule(node.target)
            calls[id(module)] += 1
            if "." in node.target or len(node.users) != 1:
                continue
            (user,) = node.users
            if user.op == "call_module" and "." not in user.target and user.args == (node,) and not user.kwargs:
                links[id(module)] = (module, parent.get_submodule(user.target))
        return calls, links

    def why_not_in_chain(self, module: nn.Module) -> str | None:
        """Why module cannot be part of a chain, or None if it can (class and kind checked by the caller)."""
        key = id(module)
        if self.registrations[key] > 1:
            return f"registered in {self.registrations[key]} places: fusing it would change its other uses"
        if _has_hooks(module):
            return "has forward or backward hooks, which would see the fused values"
        if key in self.unproven:
            return self.unproven[key]
        if self.calls[key] != 1:
            return f"called {self.calls[key]} times by the forwards seen, where a fused module must run once"
        return None


# --- the decisions --------------------------------------------------------------------------------------------


def _why_conv_unsupported(conv: nn.Module) -> str | None:
    """Why a convolution cannot become a FusedConv2d, or None."""
    if isinstance(conv, nn.ConvTranspose2d):
        return "transposed convolution: fastseg has no kernel for it"
    if type(conv) is not nn.Conv2d:
        return _why_subclass_left(conv)
    if conv.groups != 1 and conv.groups != conv.in_channels:
        return (f"groups={conv.groups} with {conv.in_channels} input channels: the fused kernel does groups=1 and "
                "depthwise only")
    return None


def _plan(model: nn.Module) -> tuple[list[tuple], list[tuple], list[nn.Module], list[Decision]]:
    """The chains to fuse (conv, bn or None, relu or None), the residual blocks to fuse (block, fused class), the
    modules to swap for their drop-ins, and one Decision per reported module."""
    analysis = _Analysis(model)
    chains: list[tuple] = []
    in_chain: dict[int, str] = {}      # module id -> its decision's detail
    blocked: dict[int, str] = {}       # BatchNorm / ReLU / block id -> why it is not fused
    blocks = _residual_blocks_from(analysis, in_chain, blocked)
    for conv in analysis.modules:
        if isinstance(conv, nn.Conv2d) and _why_conv_unsupported(conv) is None and id(conv) not in in_chain:
            chain = _chain_from(conv, analysis, blocked)
            if chain is not None:
                chains.append(chain)
                _describe_chain(chain, analysis, in_chain)

    swaps, decisions = [], []
    for module in analysis.modules:
        key, path, kind = id(module), analysis.path(module), type(module).__name__
        if key in in_chain:
            decisions.append(Decision(path, kind, "fused", in_chain[key]))
        elif key in blocked and type(module) in _RESIDUAL_BLOCKS:
            decisions.append(Decision(path, kind, "left", blocked[key]))
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            reason = _why_conv_unsupported(module)
            if reason is None:
                swaps.append(module)
                decisions.append(Decision(path, kind, "replaced", "FusedConv2d (same function, fastseg's kernel)"))
            else:
                decisions.append(Decision(path, kind, "left", reason))
        elif isinstance(module, nn.BatchNorm2d):
            if type(module) is not nn.BatchNorm2d:
                reason = _why_subclass_left(module)
            else:
                reason = blocked.get(key) or analysis.why_not_in_chain(module) or _why_conv_does_not_carry(
                    analysis.predecessor.get(key), analysis)
            decisions.append(Decision(path, kind, "left", f"not fused: {reason}"))
        elif isinstance(module, (nn.MaxPool2d, nn.MaxUnpool2d)):
            if type(module) in _DROP_IN:
                swaps.append(module)
                decisions.append(Decision(path, kind, "replaced", f"fastseg.nn.{_DROP_IN[type(module)].__name__}"))
            else:
                decisions.append(Decision(path, kind, "left", _why_subclass_left(module)))
        elif isinstance(module, nn.ReLU) and key in blocked:
            decisions.append(Decision(path, kind, "left", blocked[key]))
        elif isinstance(module, _FASTSEG_MODULES):
            decisions.append(Decision(path, kind, "left", "already a fastseg module"))
    return chains, blocks, swaps, decisions


def _residual_blocks_from(analysis: _Analysis, in_chain: dict[int, str], blocked: dict[int, str]) -> list[tuple]:
    """The residual blocks to fuse, (block, fused class), their tails described in `in_chain` (which keeps those
    modules out of the plain chains); each known block left gets its reason in `blocked`."""
    known = _residual_block_classes()
    found = []
    for block in analysis.modules:
        fused = known.get(type(block))
        if fused is None:
            continue
        reason = _why_block_not_fused(block, fused, analysis)
        if reason is not None:
            blocked[id(block)] = f"not fused: {reason}"
            continue
        found.append((block, fused))
        names = [f"{analysis.path(getattr(block, name))!r}" for name in fused.TAIL]
        kernel = f"{names[0]} -> {names[1]} -> (+ shortcut) -> {names[2]}"
        proof = f"proof: the forward of {type(block).__module__}.{type(block).__qualname__} is known exactly"
        in_chain[id(block)] = f"{fused.__name__}: {kernel} in one kernel while the BatchNorm is in eval mode; {proof}"
        conv, bn, relu = (getattr(block, name) for name in fused.TAIL)
        in_chain[id(conv)] = f"FusedConv2d, the residual kernel of {analysis.path(block)!r} with {names[1]}"
        in_chain[id(bn)] = f"folded into the residual kernel of {analysis.path(block)!r} in eval mode"
        if analysis.calls[id(relu)] == 1:  # a ReLU the block also calls elsewhere keeps running there
            in_chain[id(relu)] = f"applied by the residual kernel of {analysis.path(block)!r}"
    return found


def _why_block_not_fused(block: nn.Module, fused: type, analysis: _Analysis) -> str | None:
    """Why a block of a known class cannot be fused, or None. Its forward is known; its tail must be plain torch
    modules, used there alone, without hooks."""
    if _has_hooks(block):
        return "has forward or backward hooks, which would see the fused values"
    conv, bn, relu = (getattr(block, name) for name in fused.TAIL)
    names = dict(zip(("conv", "bn", "relu"), fused.TAIL))
    expected = {"conv": (conv, nn.Conv2d), "bn": (bn, nn.BatchNorm2d), "relu": (relu, nn.ReLU)}
    for role, (module, cls) in expected.items():
        if type(module) is not cls:
            return f"its {names[role]} is a {type(module).__qualname__}, not an nn.{cls.__name__}"
        if _has_hooks(module):
            return f"its {names[role]} has forward or backward hooks, which would see the fused values"
    reason = _why_conv_unsupported(conv)
    if reason is not None:
        return f"its {names['conv']}: {reason}"
    if bn.num_features != conv.out_channels:
        return f"its {names['bn']} has {bn.num_features} features, its {names['conv']} {conv.out_channels} outputs"
    for role in ("conv", "bn"):
        module = expected[role][0]
        if analysis.registrations[id(module)] > 1:
            return (f"its {names[role]} is registered in {analysis.registrations[id(module)]} places: fusing it "
                    "would change its other uses")
    return None


def _why_conv_does_not_carry(conv: nn.Module | None, analysis: _Analysis) -> str:
    """Why the module before an unfused BatchNorm2d did not take it into a chain."""
    if not isinstance(conv, (nn.Conv2d, nn.ConvTranspose2d)):
        return "its input is not the output of an nn.Conv2d used by it alone"
    reason = _why_conv_unsupported(conv) or analysis.why_not_in_chain(conv)
    return f"its convolution {analysis.path(conv)!r} cannot carry it: {reason}"


def _why_subclass_left(module: nn.Module) -> str:
    if isinstance(module, _FASTSEG_MODULES):
        return "already a fastseg module"
    torch_class = next(c for c in type(module).__mro__[1:] if c.__module__.startswith("torch.nn"))
    return f"a subclass of nn.{torch_class.__name__} ({type(module).__qualname__}), whose forward may differ"


def _chain_from(conv: nn.Conv2d, analysis: _Analysis, blocked: dict[int, str]):
    """The chain (conv, bn, relu) starting at conv, or None; notes in `blocked` why a BatchNorm2d or ReLU that
    follows is not taken."""
    following = analysis.successor.get(id(conv))
    if following is None or type(following) not in (nn.BatchNorm2d, nn.ReLU):
        return None
    if analysis.why_not_in_chain(conv) is not None:
        return None
    bn = None
    if type(following) is nn.BatchNorm2d:
        if following.num_features != conv.out_channels:
            blocked[id(following)] = (f"has {following.num_features} features, its convolution "
                                      f"{conv.out_channels} outputs")
            return None
        if analysis.why_not_in_chain(following) is not None:
            return None
        bn = following
        following = analysis.successor.get(id(bn))
    relu = None
    if type(following) is nn.ReLU:
        relu_reason = analysis.why_not_in_chain(following)
        if relu_reason is None:
            relu = following
        else:
            blocked[id(following)] = f"not fused: {relu_reason}"
    if bn is None and relu is None:
        return None
    return conv, bn, relu


def _describe_chain(chain: tuple, analysis: _Analysis, in_chain: dict[int, str]) -> None:
    conv, bn, relu = chain
    members = [m for m in chain if m is not None]
    names = " -> ".join(f"{analysis.path(m)!r}" for m in members)
    proof = f"proof: {analysis.prover[id(conv)]}"
    when = "while the BatchNorm is in eval mode" if bn is not None else "always"
    in_chain[id(conv)] = f"FusedChainConv2d: {names} in one kernel {when}; {proof}"
    if bn is not None:
        in_chain[id(bn)] = f"FoldedBatchNorm2d: folded into {analysis.path(conv)!r} in eval mode; {proof}"
    if relu is not None:
        in_chain[id(relu)] = f"FoldedReLU: applied by the kernel of {analysis.path(conv)!r}; {proof}"


# --- the public functions ---------------------------------------------------------------------------------------


def _check_module(model, function: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastseg.{function}: expected a torch.nn.Module, but got {type(model).__name__}")


def _copy(model: nn.Module, function: str) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as error:
        raise RuntimeError(f"fastseg.{function}: copying the model failed ({_first_line(error)}); pass "
                           "inplace=True to convert the model itself") from error


def optimize(model: nn.Module, *, inplace: bool = False, report: bool = False):
    """The model with its convolutions, BatchNorm/ReLU chains and max-pooling running on fastseg's kernels.

    See the module doc for what is swapped, how a chain's order is proven, and why the state_dict, parameter
    names and outputs stay the same (up to the rounding of a folded BatchNorm).

    The speed is on CUDA. On the CPU fastseg has no convolution kernel: the swapped convolutions run the
    plain-PyTorch reference, so an optimized model computes the same outputs there, but more slowly than torch.

    Args:
        model: any torch.nn.Module, on any device (also 'meta': nothing is computed).
        inplace: False (default): convert a deep copy; the original is untouched and shares no parameter or
            buffer with the result. True: convert the model's own modules (same objects, same parameters) and
            return it.
        report: also return a ConversionReport of what was fused, replaced and left, and why.

    Returns:
        The optimized model, or (model, ConversionReport) when report is True.
    """
    _check_module(model, "optimize")
    if not inplace:
        model = _copy(model, "optimize")
    chains, blocks, swaps, decisions = _plan(model)
    for block, fused in blocks:
        _fuse_residual_block(block, fused)
    for chain in chains:
        _fuse_chain(*chain)
    for module in swaps:
        module.__class__ = _DROP_IN[type(module)]
    return (model, ConversionReport(tuple(decisions))) if report else model


def revert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The model with every fastseg drop-in (FusedConv2d, MaxPool2d, MaxUnpool2d and a chain's modules) turned
    back into the torch module it is a subclass of: the same parameters, buffers, state_dict and outputs as the
    model optimize() was given. fastseg.nn.ConvBNAct and DenseCRF have no torch counterpart and stay.

    inplace: as in optimize (False: a deep copy is reverted; True: the model's own modules are).
    """
    _check_module(model, "revert")
    if not inplace:
        model = _copy(model, "revert")
    for module in model.modules():
        if type(module) in _TORCH_CLASS:
            _retype(module, _TORCH_CLASS[type(module)])
    return model
