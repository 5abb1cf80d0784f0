"""Plan names are exactly ``named_parameters()`` names, whatever holds the model or wraps its forward."""

import functools

import pytest
import torch
from torch import nn

from qcompile.passes.sites import find_linear_sites


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 4)})
        self.embed = nn.Embedding(4, 8)
        self.head = nn.Linear(8, 4, bias=False)
        self.head.weight = self.embed.weight  # tied, as tie_word_embeddings does

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.heads["a"](x).sum() + self.head(x).sum() + self.embed(torch.zeros(1, dtype=torch.long)).sum()


def args_decorator(forward):
    """What transformers 5.24 does to forward: a wrapper taking *args, so dynamo sees L['args'][0]."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class DecoratedNet(Net):
    @args_decorator
    def forward(self, x):
        return super().forward(x)


class Wrapper(nn.Module):
    """A peft-style wrapper: the model sits two modules down."""

    def __init__(self, model):
        super().__init__()
        self.base_model = nn.ModuleDict({"model": model})

    def forward(self, x):
        return self.base_model["model"](x)


def names_seen(fn, *inputs):
    names = []

    def backend(gm, example_inputs):
        names.extend(s.weight_names.names for s in find_linear_sites(gm, example_inputs))
        return gm.forward

    torch.compile(fn, backend=backend)(*inputs)
    return names


EXPECTED = [("layers.0.proj.weight",), ("layers.1.proj.weight",), ("heads.a.weight",),
            ("head.weight", "embed.weight")]  # primary: the name dynamo reached it by first


def expected_under(prefix):
    return [tuple(prefix + n for n in names) for names in EXPECTED]


def test_names_whatever_holds_the_model():
    x = torch.randn(2, 8)
    net = Net()
    assert names_seen(net, x) == EXPECTED
    assert names_seen(net.forward, x) == EXPECTED
    assert names_seen(lambda t: net(t), x) == EXPECTED  # a closure over the model
    assert names_seen(DecoratedNet(), x) == EXPECTED
    decorated = DecoratedNet()
    assert names_seen(decorated.forward, x) == EXPECTED
    assert names_seen(Wrapper(Net()), x) == expected_under("base_model.model.")


def test_names_of_models_in_a_list_are_relative_to_each_model():
    models = [Net(), Net()]
    names = names_seen(lambda t: models[0](t) + models[1](t), torch.randn(2, 8))
    assert names == EXPECTED + EXPECTED


@pytest.mark.parametrize("model_cls", [Net, DecoratedNet])
def test_every_name_is_a_named_parameters_name(model_cls):
    model = Wrapper(model_cls())
    valid = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for names in names_seen(model, torch.randn(2, 8)):
        assert names and set(names) <= valid


def test_an_unresolved_name_is_skipped_never_guessed():
    import dataclasses

    from qcompile import NF4, QuantConfig
    from qcompile.passes.names import WeightNames

    sites = []

    def backend(gm, example_inputs):
        sites.extend(find_linear_sites(gm, example_inputs))
        return gm.forward

    torch.compile(Block(), backend=backend)(torch.randn(2, 8))
    site = dataclasses.replace(sites[0], weight_names=WeightNames())  # as if dynamo's source were not understood
    with torch.no_grad():
        plan, = QuantConfig(default=NF4(), rules=()).plan([site])
    assert not plan.quantized and "could not be resolved" in plan.skip_reason
    assert site.qualified_name.startswith("<") and site.module_name is None
