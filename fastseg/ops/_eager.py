"""When an eager call may skip a registered op's dispatch.

Each fastseg op is a torch.library custom op: that is what torch.compile, export and fake tensors see. Its
Python dispatch layers (autograd wrapper, redispatch, argument filling, the dynamo guard) cost tens of
microseconds a call, most of a small op's host time, which a GPU op of tens of microseconds waits on. So the
public functions run the same implementation and autograd formula directly, through a torch.autograd.Function
when a gradient is needed, wherever that is safe: see :func:`skips_dispatch`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode


def skips_dispatch(x: Tensor) -> bool:
    """Whether a call on input ``x`` may run the op's implementation without its dispatch: when not compiling
    or tracing (torch.compile, export and torch.jit.trace record the op; a Triton launch would be invisible to
    them), on a plain CPU or CUDA tensor, with no dispatch mode active (FakeTensorMode and the like need the
    op's fake implementation)."""
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing() and type(x) is Tensor
            and x.device.type in ("cpu", "cuda") and _get_current_dispatch_mode() is None)


def needs_grad(*tensors) -> bool:
    """Whether autograd must record the call: grad mode on and some tensor among ``tensors`` requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def backward_of(implementation, op, eager: bool):
    """What a backward formula calls for its op's backward: the implementation directly when the forward ran
    eagerly (an autograd.Function's backward), unless autograd records the backward itself (create_graph),
    else the registered op (it has no derivative, so a double backward then fails naming it)."""
    return implementation if eager and not torch.is_grad_enabled() else op
