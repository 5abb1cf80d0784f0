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

from qcompile.decisions import UNDECIDED, decided
from qcompile.formats import Scheme, scheme_from_dict
from qcompile.ops.bindings import binding, op_arguments, op_body
from qcompile.ops.dispatch import check_kernels
from qcompile.ops.lean_op import define_lean_op
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


# The argument list; the op is defined at the end of this file, with its autograd formula (``lean_op.py`` says
# why it is not a ``custom_op``: it is called once per linear per step).
SCHEMA = (
    "(Tensor x, Tensor weight, Tensor? bias, str scheme, bool transposed, str name, str kernels, str config=\"\") "
    "-> Tensor"
)


def own_scheme(weight: torch.Tensor, scheme: str, config: str) -> str | None:
    """The scheme key to run ``weight`` with (None: float): the decision recorded for it under ``config``,
    else ``scheme``, the graph's, where ``""`` is float (``qcompile/decisions.py`` says when the two differ)."""
    own = decided(config, weight) if config else UNDECIDED
    return (scheme or None) if own == UNDECIDED else own


def _float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    w = (weight.t() if transposed else weight).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def _quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scheme: str,
    transposed: bool,
    name: str,
    kernels: str,
    config: str = "",
) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` the packed form of ``weight`` (``weight.T`` when ``transposed``)
    under ``scheme`` (see :func:`scheme_key`; ``""``: float); ``name`` is the parameter's name, for errors
    and logs (``""``: the name the backend recorded for it, ``pack_cache.remember_name``). ``config`` (a
    :func:`qcompile.decisions.config_key`) makes the weight's own recorded decision win
    over ``scheme``: float, or another scheme. The output has ``x``'s dtype."""
    own = own_scheme(weight, scheme, config)
    if own is None:
        return _float_linear(x, weight, bias, transposed)
    packed = packed_weight(weight, scheme_from_key(own), transposed, name)
    # Inside this op's own kernel: call the format op's Python body, not the op, which would cost a
    # second trip through the dispatcher (~20 us on CPU) for nothing (autograd is handled here).
    return op_body(binding(packed.scheme).op)(*op_arguments(packed, x, bias, kernels))


def _quantized_linear_fake(x, weight, bias, scheme, transposed, name, kernels, config=""):
    check_kernels(kernels)
    out_features, in_features = _features(weight, transposed)
    torch._check(x.shape[-1] == in_features,
                 lambda: f"{name or 'weight'}: x's last dimension does not match {in_features}")
    return x.new_empty((*x.shape[:-1], out_features))


GRAD_SCHEMA = (
    "(Tensor grad, Tensor weight, str scheme, bool transposed, str name, ScalarType x_dtype, str config=\"\") "
    "-> Tensor"
)


@torch.library.custom_op("qcompile::quantized_linear_grad_input", mutates_args=(), schema=GRAD_SCHEMA)
def quantized_linear_grad_input(
    grad: torch.Tensor, weight: torch.Tensor, scheme: str, transposed: bool, name: str, x_dtype: torch.dtype,
    config: str = "",
) -> torch.Tensor:
    """The gradient of ``quantized_linear`` with respect to ``x``: ``grad @ W`` through the packed weight."""
    own = own_scheme(weight, scheme, config)
    if own is None:
        w = weight.t() if transposed else weight
        return (grad.to(w.dtype) @ w).to(x_dtype)
    packed = packed_weight(weight, scheme_from_key(own), transposed, name)
    return packed.grad_input(grad, x_dtype)


@quantized_linear_grad_input.register_fake
def _(grad, weight, scheme, transposed, name, x_dtype, config=""):
    _, in_features = _features(weight, transposed)
    return grad.new_empty((*grad.shape[:-1], in_features), dtype=x_dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, scheme, transposed, name, _kernels, config = inputs
    ctx.save_for_backward(weight)
    ctx.args = (scheme, transposed, name)
    ctx.config = config
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    # The quantized weight is frozen (QLoRA): only x and bias get gradients.
    (weight,) = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.qcompile.quantized_linear_grad_input(grad, weight, *ctx.args, ctx.x_dtype, ctx.config)
    if ctx.needs_input_grad[2]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, grad_bias, None, None, None, None, None


_LIBRARY = torch.library.Library("qcompile", "FRAGMENT")
quantized_linear = define_lean_op(_LIBRARY, "quantized_linear", SCHEMA, _quantized_linear, _quantized_linear_fake,
                                  _backward, _setup_context)
