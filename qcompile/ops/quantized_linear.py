"""``qcompile::quantized_linear``: the op the rewrite pass emits for every quantized linear.

It takes the *float parameter* (not its packed tensors) and finds the packed form at run time
(:func:`qcompile.pack_cache.packed_weight`), then runs the format's op. Why not bake the packed
tensors into the graph as constants: dynamo reuses one graph for every instance of a model class
(parameters are graph inputs), so constants would belong to whichever instance compiled first,
and they would go stale when the weights change (``load_state_dict``, ``copy_``, ``.to()``).
Resolving per call keeps every call on the packed form of the parameter it was given, repacked
when that parameter changed; the price is a dictionary lookup and a stamp comparison per call
(``benchmarks/call_overhead.py``), and that the packed tensors are invisible to inductor.

The scheme travels as its canonical JSON text (``scheme_key``), parsed once per distinct text.
"""

from __future__ import annotations

import functools
import json

import torch

from qcompile.formats import Scheme, scheme_from_dict
from qcompile.ops.dispatch import check_kernels
from qcompile.pack_cache import packed_weight


def scheme_key(scheme: Scheme) -> str:
    """The scheme as canonical JSON, the op's ``scheme`` argument."""
    return json.dumps(scheme.to_dict(), sort_keys=True)


@functools.lru_cache(maxsize=256)
def scheme_from_key(key: str) -> Scheme:
    """Inverse of :func:`scheme_key` (memoized: a graph passes the same few texts on every call)."""
    return scheme_from_dict(json.loads(key), key="scheme")


def _features(weight: torch.Tensor, transposed: bool) -> tuple[int, int]:
    out_features, in_features = weight.shape[-2], weight.shape[-1]
    return (in_features, out_features) if transposed else (out_features, in_features)


SCHEMA = "(Tensor x, Tensor weight, Tensor? bias, str scheme, bool transposed, str name, str kernels) -> Tensor"


@torch.library.custom_op("qcompile::quantized_linear", mutates_args=(), schema=SCHEMA)
def quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: str,
    transposed: bool,
    name: str,
    kernels: str,
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` the packed form of ``weight`` (``weight.T`` when ``transposed``)
    under ``scheme`` (see :func:`scheme_key`); ``name`` is the parameter's name, for errors and logs.
    The output has ``x``'s dtype."""
    packed = packed_weight(weight, scheme_from_key(scheme), transposed, name)
    # Inside this op's own kernel: call the format op's Python body, not the op, which would cost a
    # second trip through the dispatcher (~20 us on CPU) for nothing (autograd is handled here).
    return _body(packed.scheme.op)(x, *packed.op_tensors().values(), bias, *packed.op_constants(), kernels)


@functools.cache
def _body(op: torch._ops.OpOverload):
    """The Python function a ``torch.library.custom_op`` was made from; the op itself if that is not found."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(op._schema.name)
    return getattr(opdef, "_init_fn", None) or op


@quantized_linear.register_fake
def _(x, weight, bias, scheme, transposed, name, kernels):
    check_kernels(kernels)
    out_features, in_features = _features(weight, transposed)
    torch._check(x.shape[-1] == in_features, lambda: f"{name}: x's last dimension does not match {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


GRAD_SCHEMA = "(Tensor grad, Tensor weight, str scheme, bool transposed, str name, ScalarType x_dtype) -> Tensor"


@torch.library.custom_op("qcompile::quantized_linear_grad_input", mutates_args=(), schema=GRAD_SCHEMA)
def quantized_linear_grad_input(
    grad: torch.Tensor, weight: torch.Tensor, scheme: str, transposed: bool, name: str, x_dtype: torch.dtype
) -> torch.Tensor:
    """The gradient of ``quantized_linear`` with respect to ``x``: ``grad @ W`` through the packed weight."""
    packed = packed_weight(weight, scheme_from_key(scheme), transposed, name)
    return packed.grad_input(grad, x_dtype)


@quantized_linear_grad_input.register_fake
def _(grad, weight, scheme, transposed, name, x_dtype):
    _, in_features = _features(weight, transposed)
    return grad.new_empty((*grad.shape[:-1], in_features), dtype=x_dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, scheme, transposed, name, _kernels = inputs
    ctx.save_for_backward(weight)
    ctx.args = (scheme, transposed, name)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    # The quantized weight is frozen (QLoRA): only x and bias get gradients.
    (weight,) = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.qcompile.quantized_linear_grad_input(grad, weight, *ctx.args, ctx.x_dtype)
    if ctx.needs_input_grad[2]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, grad_bias, None, None, None, None


quantized_linear.register_autograd(_backward, setup_context=_setup_context)
