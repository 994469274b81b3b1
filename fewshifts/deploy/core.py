"""``deploy(model)``: the inference form of a shift network (SSL section 4.3).

The eval-mode model is traced with ``torch.fx`` (shift layers kept as leaves; a submodule that cannot be
traced is handled child by child) and rewritten by graph passes that keep the outputs:

1. BatchNorm folded into the convolution before it.
2. Each shift layer baked: an integer shift (grouped / sparse) becomes :class:`IntegerShift`; an all-zero
   one is removed (a :class:`Subsample` when strided); an active shift (ASL, bilinear) cannot be rounded
   without changing the outputs, so it becomes the exact depthwise convolution holding its bilinear
   weights (design.md section 4: the fastest exact form on CPU).
3. Channels permuted so equal displacements are contiguous and the unshifted group comes first: the
   producing 1x1 convolution (through BN / activations / pooling) has its output channels and the consuming
   convolutions their input channels reordered (through a squeeze-excite too: its mean, and its gate product
   with the gate's convolution reordered). The shift then runs in place on the shifted channels only.
4. FE-Block units write their output back into the input's memory instead of concatenating
   (``cat([x[:, :k], f(x[:, k:])])`` -> ``x[:, k:] = f(...)``, or ``+=`` for a residual unit).
5. Identity / eval-mode dropout removed; channels_last memory format by default.
6. Every convolution one oneDNN call (:class:`ConvAct`): a following ReLU / ReLU6 fused as a post-op, the
   weights reordered once into oneDNN's blocked layout instead of on every call.
"""

from __future__ import annotations

import copy
import operator
from functools import partial

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval

from fewshifts.deploy.modules import ConvAct, IntegerShift, Subsample, bilinear_kernel, write_back
from fewshifts.deploy.tracing import trace
from fewshifts.layers import ActiveShift2d, ShiftLayer

__all__ = ["deploy", "DeployedModel", "MAX_BILINEAR_RADIUS"]

MAX_BILINEAR_RADIUS = 8  # an active shift reaching further keeps the bilinear op instead of a huge kernel
_MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}

# modules that act on each channel independently (a channel permutation passes through them)
_PER_CHANNEL = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU, nn.Identity, nn.Dropout, nn.AvgPool2d, nn.MaxPool2d, nn.BatchNorm2d)
_PER_CHANNEL_FN = {F.relu, F.relu6, F.hardswish, F.silu, F.gelu, torch.relu, torch.sigmoid, torch.tanh,
                   F.avg_pool2d, F.max_pool2d}
_PER_CHANNEL_METHOD = {"relu", "relu_", "sigmoid", "tanh"}
# nodes whose output is a fresh tensor (not a view of another), safe to modify in place
_FRESH_MODULES = (nn.Conv2d, ConvAct, nn.BatchNorm2d, nn.AvgPool2d, nn.MaxPool2d, nn.Linear, ShiftLayer,
                  IntegerShift)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.LeakyReLU, nn.GELU)


class DeployedModel(nn.Module):
    """The deployed network plus the memory format its input is put in.

    In eager inference a graph model runs through a copy of its graph that calls each submodule's ``forward``
    directly (a module's own hooks still run): the generated code otherwise spends a few microseconds per node
    on attribute chains and ``nn.Module.__call__``, about 1 ms of a 15 ms FE-Net forward at batch 1.
    """

    def __init__(self, model: nn.Module, memory_format: str) -> None:
        super().__init__()
        self.model = model
        self.memory_format = memory_format

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=_MEMORY_FORMATS[self.memory_format])
        if _plain_eager(x) and isinstance(self.model, fx.GraphModule) and not self._forward_hooks \
                and not self._forward_pre_hooks and not _global_hooks():
            direct = self.__dict__.get("_direct")  # kept out of the module tree (no state, not in modules())
            if direct is None or direct[0] is not self.model.graph:
                direct = self.__dict__["_direct"] = (self.model.graph, _direct_calls(self.model))
            return direct[1](x)
        return self.model(x)

    def __getstate__(self):  # copies rebuild the direct-call graph
        state = self.__dict__.copy()
        state.pop("_direct", None)
        return state

    def extra_repr(self) -> str:
        return f"memory_format={self.memory_format}"


def _plain_eager(x: Tensor) -> bool:
    return (type(x) is Tensor and not (x.requires_grad and torch.is_grad_enabled()) and not torch.jit.is_tracing()
            and not torch.jit.is_scripting() and not torch.compiler.is_compiling())


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


class _DirectCall:
    """Calls a submodule's ``forward`` without ``nn.Module.__call__`` unless the module has forward hooks."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module, self.forward = module, module.forward
        self.__name__ = self.__qualname__ = name
        self.__module__ = "fewshifts_deployed"  # not torch: fx's code generator keeps the object as a global

    def __call__(self, *args, **kwargs):
        m = self.module
        if m._forward_pre_hooks or m._forward_hooks:
            return m(*args, **kwargs)
        return self.forward(*args, **kwargs)


def _direct_calls(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every ``call_module`` node turned into a call of a :class:`_DirectCall` (same modules)."""
    graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            call = _DirectCall(gm.get_submodule(node.target), "m_" + node.target.replace(".", "_"))
            new = graph.call_function(call, fx.map_arg(node.args, env.__getitem__),
                                      fx.map_arg(node.kwargs, env.__getitem__))
        else:
            new = graph.node_copy(node, env.__getitem__)
        env[node] = new
    return fx.GraphModule(gm, graph)


@torch.no_grad()
def deploy(model: nn.Module, example_input: Tensor | None = None, memory_format: str = "channels_last",
           inplace: bool = True, lowered: bool = False) -> DeployedModel:
    """Inference form of ``model``: same eval-mode outputs, BN folded, integer shifts baked, faster.

    ``example_input`` (default: one image of ``model.default_cfg['input_size']``) only fixes shapes.
    ``memory_format``: channels_last (default) or contiguous (NCHW). In NCHW an in-place shift moves whole planes
    and costs almost nothing, but oneDNN's 1x1 convolutions and 2x2 average pools are much slower there: on
    this project's AVX2 benchmark machine deployed FE-Net 1.0x SSL (90% unshifted) took 1.3-1.5x as long in
    NCHW at batch 1 and 32 (docs/benchmarks/latency.md), so channels_last is the fixed default.
    ``inplace=False`` avoids in-place shifts and write-back; ``lowered=True`` also writes integer shifts
    with standard operators (Slice / Pad / Concat), the form exported to ONNX. The deployed model keeps the
    model's dtype (float32 is the fast path: oneDNN convolutions with prepacked weights).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model should be an nn.Module instead of {type(model).__name__}")
    if memory_format not in _MEMORY_FORMATS:
        raise ValueError(f"memory_format should be one of {tuple(_MEMORY_FORMATS)} instead of {memory_format!r}")
    if lowered:
        inplace = False
    model = copy.deepcopy(model).eval().cpu()
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if example_input is None:
        example_input = torch.randn(1, *_input_size(model))
    example_input = example_input.detach().cpu().to(dtype)
    shapes = _record_input_shapes(model, example_input)
    passes = _Passes(inplace=inplace, lowered=lowered)
    for name, gm, parent in _traced_roots(model, "", shapes):
        ShapeProp(gm).propagate(*_examples(shapes[name]))
        passes.run(gm)
        if parent is None:
            model = gm
        else:
            setattr(parent, name.rsplit(".", 1)[-1], gm)
    if memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return DeployedModel(model, memory_format).eval()


def _input_size(model: nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "default_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(cfg["input_size"])
    spec = getattr(model, "model_spec", None) or {}
    return (spec.get("in_chans", 3), 224, 224)


def _record_input_shapes(model: nn.Module, example_input: Tensor) -> dict[str, tuple]:
    """{module name: its first call's arguments, tensors as (shape, dtype, memory format)} from one forward."""
    seen: dict[str, tuple] = {"": (_describe(example_input),)}
    handles = []
    for name, module in model.named_modules():
        if name:
            def hook(_, args, name=name):
                seen.setdefault(name, tuple(_describe(a) for a in args))
            handles.append(module.register_forward_pre_hook(hook))
    try:
        model(example_input)
    finally:
        for h in handles:
            h.remove()
    return seen


def _describe(a):
    if isinstance(a, Tensor):
        fmt = torch.channels_last if a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) else None
        return ("tensor", tuple(a.shape), a.dtype, fmt)
    return a


def _examples(described: tuple) -> tuple:
    out = []
    for d in described:
        if isinstance(d, tuple) and len(d) == 4 and d[0] == "tensor":
            t = torch.randn(d[1]).to(d[2]) if d[2].is_floating_point else torch.zeros(d[1], dtype=d[2])
            out.append(t.contiguous(memory_format=d[3]) if d[3] is not None else t)
        else:
            out.append(d)
    return tuple(out)


def _traced_roots(module: nn.Module, name: str, shapes: dict, parent: nn.Module | None = None):
    """(name, GraphModule, parent) for the largest traceable submodules that run in forward."""
    if name not in shapes:  # never called
        return []
    if isinstance(module, ShiftLayer):
        module = _Wrapped(module)  # a shift layer called directly by untraceable code: a one-node graph
    gm = trace(module, _examples(shapes[name]))
    if gm is not None:
        return [(name, gm, parent)]
    roots = []
    for child_name, child in module.named_children():
        roots += _traced_roots(child, f"{name}.{child_name}" if name else child_name, shapes, module)
    return roots


class _Wrapped(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


# ---------------------------------------------------------------------------------------------------------
# graph passes


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is(gm: fx.GraphModule, node, kind) -> bool:
    return isinstance(node, fx.Node) and isinstance(_module(gm, node), kind)


def _channels(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return int(meta.shape[1]) if hasattr(meta, "shape") and len(meta.shape) == 4 else None


class _Passes:
    def __init__(self, inplace: bool, lowered: bool) -> None:
        self.inplace, self.lowered = inplace, lowered

    def run(self, gm: fx.GraphModule) -> None:
        for step in (self.fold_bn, self.drop_identities, self.bake_shifts, self.write_back, self.fuse_activations):
            step(gm)
            gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()

    # -- 1. BN folding ------------------------------------------------------------------------------------
    def fold_bn(self, gm: fx.GraphModule) -> None:
        uses = _module_uses(gm)
        for node in list(gm.graph.nodes):
            if not _is(gm, node, nn.BatchNorm2d) or not node.args or not _is(gm, node.args[0], nn.Conv2d):
                continue
            conv_node, bn = node.args[0], _module(gm, node)
            if len(conv_node.users) != 1 or uses[conv_node.target] != 1 or uses[node.target] != 1:
                continue
            if bn.running_mean is None:
                continue
            _set_module(gm, conv_node.target, fuse_conv_bn_eval(_module(gm, conv_node), bn))
            node.replace_all_uses_with(conv_node)
            gm.graph.erase_node(node)

    # -- 5. identities and eval-mode dropout --------------------------------------------------------------
    def drop_identities(self, gm: fx.GraphModule) -> None:
        for node in list(gm.graph.nodes):
            identity = _is(gm, node, (nn.Identity, nn.Dropout)) or (
                node.op == "call_function" and node.target in (F.dropout, torch.dropout)
            )
            if identity and node.args and isinstance(node.args[0], fx.Node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)

    # -- 2./3. shifts -------------------------------------------------------------------------------------
    def bake_shifts(self, gm: fx.GraphModule) -> None:
        uses = _module_uses(gm)
        for node in list(gm.graph.nodes):
            layer = _module(gm, node)
            if not isinstance(layer, ShiftLayer) or uses[node.target] != 1:
                continue
            if isinstance(layer, ActiveShift2d):
                _set_module(gm, node.target, _bilinear_module(layer))
                continue
            shifts = layer.integer_shifts()
            if not bool(shifts.any()):
                if layer.stride == 1:
                    node.replace_all_uses_with(node.args[0])
                    gm.graph.erase_node(node)
                else:
                    _set_module(gm, node.target, Subsample(layer.stride))
                continue
            perm = _sort_order(shifts)
            if not torch.equal(perm, torch.arange(len(perm))) and _permute_neighbours(gm, node, perm, uses):
                shifts = shifts[perm]
            inplace = self.inplace and layer.stride == 1 and _fresh(gm, node.args[0], node)
            _set_module(gm, node.target, IntegerShift(shifts, layer.stride, inplace, self.lowered))

    # -- 6. conv (+ ReLU) in one oneDNN call, weights prepacked -------------------------------------------
    def fuse_activations(self, gm: fx.GraphModule) -> None:
        if not self.inplace or not torch.backends.mkldnn.is_available():
            return
        uses = _module_uses(gm)
        for node in list(gm.graph.nodes):
            act = _activation_name(gm, node)
            conv_node = node.args[0] if act and node.args else None
            if not _is(gm, conv_node, nn.Conv2d) or len(conv_node.users) != 1 or uses[conv_node.target] != 1:
                continue
            if _module(gm, conv_node).padding_mode != "zeros" or isinstance(_module(gm, conv_node).padding, str):
                continue
            _set_module(gm, conv_node.target, ConvAct(_module(gm, conv_node), act))
            node.replace_all_uses_with(conv_node)
            gm.graph.erase_node(node)
        for node in gm.graph.nodes:  # the other convolutions: one oneDNN call with prepacked weights too
            conv = _module(gm, node)
            if type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
                _set_module(gm, node.target, ConvAct(conv, None))

    # -- 4. FE-Block write-back ---------------------------------------------------------------------------
    def write_back(self, gm: fx.GraphModule) -> None:
        if not self.inplace:
            return
        for node in list(gm.graph.nodes):
            plan = _write_back_plan(gm, node)
            if plan is None:
                continue
            base, starts, values, accumulate, dead = plan
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(write_back, (base, tuple(starts), tuple(values), tuple(accumulate)))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            _erase_dead(gm, dead)


def _erase_dead(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` left without users, and then their now unused pure inputs (slices, adds, splits)."""
    while nodes:
        node = nodes.pop()
        if node.graph is not gm.graph or node.users or node.op in ("placeholder", "output", "call_module"):
            continue
        inputs = [a for a in node.all_input_nodes]
        gm.graph.erase_node(node)
        nodes.extend(inputs)


def _activation_name(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'relu' / 'relu6' for a ReLU / ReLU6 node (module, function or method), else None."""
    m = _module(gm, node)
    if isinstance(m, nn.ReLU) or (node.op == "call_function" and node.target in (F.relu, torch.relu)) or (
            node.op == "call_method" and node.target in ("relu", "relu_")):
        return "relu"
    if isinstance(m, nn.ReLU6) or (node.op == "call_function" and node.target is F.relu6):
        return "relu6"
    return None


def _module_uses(gm: fx.GraphModule) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
    return uses


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _bilinear_module(layer: ActiveShift2d) -> nn.Module:
    kernel = bilinear_kernel(layer.shifts)
    radius = kernel.shape[-1] // 2
    if radius > MAX_BILINEAR_RADIUS:
        return copy.deepcopy(layer)
    conv = nn.Conv2d(layer.channels, layer.channels, kernel.shape[-1], layer.stride, radius, groups=layer.channels,
                     bias=False, dtype=layer.shifts.dtype)
    conv.weight.data.copy_(kernel.to(conv.weight.dtype))
    conv.requires_grad_(False)
    return conv


def _sort_order(shifts: Tensor) -> Tensor:
    """Channel order grouping equal displacements, the unshifted group first (stable)."""
    key = [(0 if (dy, dx) == (0, 0) else 1, dy, dx, c) for c, (dy, dx) in enumerate(shifts.tolist())]
    return torch.tensor([k[-1] for k in sorted(key)], dtype=torch.long)


def _is_per_channel(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), _PER_CHANNEL)
    if node.op == "call_function":
        return node.target in _PER_CHANNEL_FN
    return node.op == "call_method" and node.target in _PER_CHANNEL_METHOD


def _is_dense_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An ungrouped ``nn.Conv2d`` (a grouped one's channels cannot be reordered freely)."""
    return _is(gm, node, nn.Conv2d) and _module(gm, node).groups == 1


def _is_spatial_mean(node: fx.Node) -> bool:
    """``x.mean((2, 3), keepdim=True)`` of a 4-D ``x``: one value per channel (a permutation passes through)."""
    if not ((node.op == "call_method" and node.target == "mean")
            or (node.op == "call_function" and node.target is torch.mean)):
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return (isinstance(node.args[0], fx.Node) and _channels(node.args[0]) is not None and keepdim is True
            and isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3])


def _channel_gate(gm: fx.GraphModule, node: fx.Node, x: fx.Node, channels: int):
    """(conv, per-channel ops) when ``node`` is ``x * act(conv(...))`` (an SE gate), the conv giving ``channels``
    channels and it and the ops used only there; else None."""
    if node.op != "call_function" or node.target not in (operator.mul, torch.mul) or len(node.args) != 2 \
            or node.kwargs or list(node.args).count(x) != 1:
        return None
    chain, gate = [], node.args[1] if node.args[0] is x else node.args[0]
    while isinstance(gate, fx.Node) and _is_per_channel(gm, gate) and len(gate.users) == 1:
        chain.append(gate)
        gate = gate.args[0]
    if _is_dense_conv(gm, gate) and len(gate.users) == 1 and _module(gm, gate).out_channels == channels:
        return gate, chain
    return None


def _permute_neighbours(gm: fx.GraphModule, shift_node: fx.Node, perm: Tensor, uses: dict[str, int]) -> bool:
    """Reorder the producer's output and the consumers' input channels by ``perm``; False if not possible."""
    # producer: back through per-channel ops (each used once) to a dense convolution used once
    chain, node = [], shift_node.args[0]
    while isinstance(node, fx.Node) and _is_per_channel(gm, node) and len(node.users) == 1:
        chain.append(node)
        node = node.args[0]
    if not (isinstance(node, fx.Node) and _is_dense_conv(gm, node) and len(node.users) == 1):
        return False
    producer = node
    # consumers: forward through per-channel ops to dense convolutions, nothing else
    # (a squeeze-excite's mean and its gate product pass too; the gate's convolution is a producer)
    consumers, after, producers, frontier = [], [], [producer], [(u, shift_node) for u in shift_node.users]
    while frontier:
        user, source = frontier.pop()
        gate = _channel_gate(gm, user, source, len(perm))
        if _is_dense_conv(gm, user) and user.args[0] is not None:
            consumers.append(user)
        elif _is_per_channel(gm, user) or _is_spatial_mean(user) or gate is not None:
            if gate is not None:
                producers.append(gate[0])
                chain += gate[1]
            else:
                after.append(user)
            frontier.extend((u, user) for u in user.users)
        else:
            return False
    modules = [*producers, *chain, *consumers, *after]
    if any(n.op == "call_module" and uses[n.target] != 1 for n in modules):
        return False
    if any(n.op != "call_module" and len(n.args) > 1 and any(isinstance(a, fx.Node) for a in n.args[1:])
           for n in chain + after):
        return False
    for conv in map(partial(_module, gm), producers):
        conv.weight.data = conv.weight.data[perm].contiguous()
        if conv.bias is not None:
            conv.bias.data = conv.bias.data[perm].contiguous()
    for n in chain + after:
        m = _module(gm, n)
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                if t is not None:
                    t.data = t.data[perm].contiguous()
    for n in consumers:
        m = _module(gm, n)
        m.weight.data = m.weight.data[:, perm].contiguous()
    return True


def _fresh(gm: fx.GraphModule, node: fx.Node, reader: fx.Node) -> bool:
    """True if ``reader`` is the only user of ``node`` and ``node``'s tensor is its own memory."""
    return isinstance(node, fx.Node) and _data_users(node) == [reader] and _fresh_tensor(gm, node)


def _data_users(node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` that read its values (not only its shape: ``x.shape``, ``x.size()``, ``x.dim()``)."""
    return [u for u in node.users if not (
        (u.op == "call_function" and u.target is getattr and u.args[1:] in (("shape",), ("ndim",)))
        or (u.op == "call_method" and u.target in ("size", "dim")))]


def _fresh_tensor(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True if ``node``'s tensor owns its memory (not an input, not a view; an in-place activation counts
    as fresh when its input is fresh and used only by it)."""
    if node.op == "call_function":
        return node.target in (write_back, operator.add, torch.add, torch.cat, operator.mul, torch.mul)
    if node.op != "call_module":
        return False
    m = _module(gm, node)
    if isinstance(m, _ACTIVATIONS) and getattr(m, "inplace", False):
        return _fresh(gm, node.args[0], node)
    return isinstance(m, _FRESH_MODULES + _ACTIVATIONS)


# ---------------------------------------------------------------------------------------------------------
# FE-Block write-back: cat([x[:, :k], f(x[:, k:])], dim=1) -> x[:, k:] = f(...)


def _slice_of(node) -> tuple[fx.Node, int, int] | None:
    """(base, start, stop) when ``node`` is a channel slice of a 4-D tensor (``x[:, a:b]``, split, narrow)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        base, index = node.args
        base_channels = _channels(base) if isinstance(base, fx.Node) else None
        if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and isinstance(index[1], slice):
            if base_channels is None or index[1].step not in (None, 1):
                return None
            start, stop, _ = index[1].indices(base_channels)
            return base, start, stop
        if isinstance(index, int) and isinstance(base, fx.Node) and _is_split(base):
            return _split_piece(base, index)
        return None
    if node.op in ("call_method", "call_function") and node.target in ("narrow", torch.narrow):
        base, dim, start, length = (list(node.args) + [None] * 4)[:4]
        if dim in (1, -3) and isinstance(start, int) and isinstance(length, int):
            return base, start, start + length
    return None


def _is_split(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("split", "chunk", "tensor_split")) or (
        node.op == "call_function" and node.target in (torch.split, torch.chunk, torch.tensor_split))


def _split_piece(split: fx.Node, index: int) -> tuple[fx.Node, int, int] | None:
    base = split.args[0]
    dim = split.kwargs.get("dim", split.args[2] if len(split.args) > 2 else 0)
    metas = split.meta.get("tensor_meta")
    if dim not in (1, -3) or not isinstance(metas, (tuple, list)) or not isinstance(base, fx.Node):
        return None
    sizes = [int(m.shape[1]) for m in metas]
    return base, sum(sizes[:index]), sum(sizes[: index + 1])


def _precedes(a: fx.Node, b: fx.Node) -> bool:
    order = {n: i for i, n in enumerate(a.graph.nodes)}
    return order[a] < order[b]


def _write_back_plan(gm: fx.GraphModule, cat: fx.Node):
    """How to turn a channel concatenation that rebuilds its input into an in-place write-back, or None."""
    if cat.op != "call_function" or cat.target not in (torch.cat, torch.concat, torch.concatenate):
        return None
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
    if dim not in (1, -3) or not isinstance(tensors, (list, tuple)) or len(tensors) < 2:
        return None
    base, offset, starts, values, accumulate, views = None, 0, [], [], [], []
    for t in tensors:
        width = _channels(t) if isinstance(t, fx.Node) else None
        if width is None:
            return None
        piece = _slice_of(t)
        if piece is not None and piece[1] == offset:  # passed through unchanged
            base = base or piece[0]
            if piece[0] is not base or piece[2] - piece[1] != width:
                return None
            views.append(t)
        else:
            residual = _residual_view(t, offset, width)
            starts.append(offset)
            values.append(residual[1] if residual else t)
            accumulate.append(residual is not None)
            if residual:
                views.append(residual[0])
        offset += width
    if base is None or not values or _channels(base) != offset:
        return None
    base_meta, cat_meta = base.meta.get("tensor_meta"), cat.meta.get("tensor_meta")
    if base_meta is None or cat_meta is None or tuple(base_meta.shape) != tuple(cat_meta.shape):
        return None
    if not _fresh_base(gm, base, cat):
        return None
    return base, starts, values, accumulate, [t for t in tensors if isinstance(t, fx.Node)]


def _residual_view(node: fx.Node, offset: int, width: int) -> tuple[fx.Node, fx.Node] | None:
    """(view, y) when ``node`` is ``view + y`` with ``view`` the slice [offset, offset + width) of the base."""
    if not (node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.users) == 1):
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    for view, y in (node.args, node.args[::-1]):
        piece = _slice_of(view)
        if piece is not None and piece[1:] == (offset, offset + width) and isinstance(y, fx.Node):
            if _channels(y) == width and all(_precedes(u, node) or u is node for u in view.users):
                return view, y
    return None


def _fresh_base(gm: fx.GraphModule, base: fx.Node, cat: fx.Node) -> bool:
    """The base may be overwritten: not an input, used only through channel slices all read by ``cat``'s time."""
    if not _fresh_tensor(gm, base):
        return False
    for user in _data_users(base):
        pieces = list(user.users) if _is_split(user) else [user]
        if any(_slice_of(p) is None for p in pieces):
            return False
        if any(not (_precedes(u, cat) or u is cat) for p in pieces for u in p.users):
            return False
    return True
