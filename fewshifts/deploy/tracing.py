"""``torch.fx`` tracing for deployment: shift layers stay leaves; shape-dependent Python code is handled.

Plain symbolic tracing fails on code such as ``k = x.shape[1] - g; if k: ...`` (FE-Blocks). The fallback
:class:`ConcreteTracer` runs the example input alongside the trace, so shapes are concrete numbers, except the
batch dimension, which stays symbolic so the graph works for any batch size.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import Tensor, nn

from fewshifts.deploy.modules import IntegerShift, Subsample
from fewshifts.layers import ShiftLayer

__all__ = ["LeafTracer", "ConcreteTracer", "trace"]

_LEAVES = (ShiftLayer, IntegerShift, Subsample)


class LeafTracer(fx.Tracer):
    """Symbolic tracer keeping shift layers (custom ops inside) as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


_MISSING = object()


class _ValueProxy(fx.Proxy):
    """A proxy carrying the value its node takes on the example input."""

    value = _MISSING

    @property
    def shape(self):
        if isinstance(self.value, Tensor):
            return _Shape(self, self.value.shape)
        return self.tracer.create_proxy("call_function", getattr, (self, "shape"), {})

    def size(self, dim: int | None = None):
        if not isinstance(self.value, Tensor):
            return self.tracer.create_proxy("call_method", "size", (self,) if dim is None else (self, dim), {})
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.value.dim() if isinstance(self.value, Tensor) else super().__getattr__("dim")()

    @property
    def ndim(self) -> int:
        return self.dim()

    def __len__(self) -> int:
        if isinstance(self.value, (Tensor, tuple, list)):
            return len(self.value)
        raise TypeError("len() of a traced value whose length is unknown")

    def __iter__(self):
        if isinstance(self.value, (tuple, list)):
            return iter([self[i] for i in range(len(self.value))])
        return super().__iter__()


class _Shape(tuple):
    """A tensor shape whose batch entry is symbolic (a proxy) and the others concrete."""

    def __new__(cls, proxy: _ValueProxy, shape: torch.Size):
        self = super().__new__(cls, shape)
        self.proxy = proxy
        return self

    def __getitem__(self, index):
        if isinstance(index, int) and index in (0, -len(self)):
            return self.proxy.tracer.create_proxy("call_method", "size", (self.proxy, 0), {})
        if isinstance(index, slice):
            return tuple(self[i] for i in range(len(self))[index])
        return tuple.__getitem__(self, index)

    def __iter__(self):
        return iter([self[i] for i in range(len(self))])


def _value_of(a):
    if isinstance(a, _ValueProxy):
        if a.value is _MISSING:
            raise RuntimeError(f"no example value for {a.node}")
        return a.value
    return a


class ConcreteTracer(LeafTracer):
    """Traces with the example arguments run alongside, making shape arithmetic and branches concrete."""

    def __init__(self, example_args: tuple) -> None:
        super().__init__()
        self.example_args = list(example_args)
        self._placeholders = 0

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn or (lambda node: _ValueProxy(node, self)))
        if not isinstance(proxy, _ValueProxy):
            return proxy
        if kind == "placeholder":
            if self._placeholders < len(self.example_args):
                proxy.value = self.example_args[self._placeholders]
            self._placeholders += 1
            return proxy
        vargs = fx.node.map_aggregate(args, _value_of)
        vkwargs = fx.node.map_aggregate(kwargs, _value_of)
        self._computing = True
        try:
            self._compute(proxy, kind, target, vargs, vkwargs)
        finally:
            self._computing = False
        return proxy  # (in-place modules may change a value later; only shapes are used)

    @torch.no_grad()
    def _compute(self, proxy, kind, target, vargs, vkwargs) -> None:
        if kind == "call_function":
            proxy.value = target(*vargs, **vkwargs)
        elif kind == "call_method":
            proxy.value = getattr(vargs[0], target)(*vargs[1:], **vkwargs)
        elif kind == "call_module":
            proxy.value = self._leaf_forward(*vargs, **vkwargs)
        elif kind == "get_attr":
            proxy.value = operator.attrgetter(target)(self.root)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if getattr(self, "_computing", False):  # plain attribute access while computing example values
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        self._leaf_forward = forward  # the module's own forward (Module.__call__ is patched while tracing)
        return super().call_module(m, forward, args, kwargs)


def trace(module: nn.Module, example_args: tuple | None) -> fx.GraphModule | None:
    """``module`` as a GraphModule (symbolic tracing, else concrete tracing with ``example_args``), or None."""
    try:
        return _graph_module(module, LeafTracer().trace(module))
    except Exception:
        if example_args is None:
            return None
    try:
        return _graph_module(module, ConcreteTracer(example_args).trace(module))
    except Exception:
        return None


def _graph_module(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """GraphModule without the nodes' type annotations: under ``from __future__ import annotations`` they are
    strings (``'Tensor'``), which fx's generated code keeps as globals that ``torch.save`` cannot pickle."""
    for node in graph.nodes:
        node.type = None
    return fx.GraphModule(module, graph, module.__class__.__name__)
