"""``quantized_linear``'s registration (``qcompile/ops/lean_op.py``): autograd only where a graph is needed."""

import torch

import qcompile
import qcompile.ops  # noqa: F401  (registers the ops)
from qcompile import NF4
from qcompile.ops.quantized_linear import scheme_key

SCHEME = NF4(double_quant=True, compute_dtype=torch.float32)


def _case(x_grad: bool, weight_grad: bool):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(24, 128), requires_grad=weight_grad)
    x = torch.randn(3, 128, requires_grad=x_grad)
    # The rewrite leaves the trailing `config` argument out when there is none: the op must fill it in.
    args = (x, weight, None, scheme_key(SCHEME), False, "w", "reference")
    return weight, x, args


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    return qcompile.pack(weight.detach(), SCHEME).dequantize(torch.float32)


def test_no_graph_is_recorded_when_nothing_needs_one():
    weight, x, args = _case(x_grad=False, weight_grad=False)
    out = torch.ops.qcompile.quantized_linear.default(*args)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, x @ _dequantized(weight).t(), rtol=1e-5, atol=1e-5)
    _, x, args = _case(x_grad=True, weight_grad=False)
    with torch.no_grad():
        assert torch.ops.qcompile.quantized_linear.default(*args).grad_fn is None


def test_the_input_gradient_goes_through_the_packed_weight():
    weight, x, args = _case(x_grad=True, weight_grad=False)
    out = torch.ops.qcompile.quantized_linear.default(*args)
    assert out.requires_grad
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ _dequantized(weight), rtol=1e-5, atol=1e-5)


def test_a_trainable_quantized_weight_keeps_the_output_in_the_graph_and_gets_no_gradient():
    # As with torch.library.custom_op: the weight is frozen by design (the backend warns about it at compile).
    weight, x, args = _case(x_grad=False, weight_grad=True)
    out = torch.ops.qcompile.quantized_linear.default(*args)
    assert out.requires_grad
    out.sum().backward()
    assert weight.grad is None
