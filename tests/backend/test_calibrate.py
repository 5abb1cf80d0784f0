"""``qcompile.calibrate``: GPTQ through the compiled graph, stage by stage, then compiled with its config."""

import copy

import pytest
import torch

import qcompile
from qcompile.pack_cache import cached_packed_weights, is_released
from tests.models import MLP, tiny_llama

GPTQ_CONFIG = {"format": "qcompile", "version": 1, "default": {"type": "gptq", "bits": 4, "group_size": 32,
                                                               "sym": False, "desc_act": True},
               "rules": [{"match": "lm_head", "scheme": "skip"}]}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def batches(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, 5 + 3 * i), generator=gen)} for i in range(n)]


def dequantized_copy(original, calibrated):
    """``original`` with every linear weight that ``calibrated`` packed replaced by that packed form, decoded."""
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for param, packed_param in zip(reference.parameters(), calibrated.parameters(), strict=True):
            forms = cached_packed_weights(packed_param)
            if forms:
                param.copy_(forms[0].dequantize(param.dtype))
    return reference


@torch.no_grad()
def test_calibrated_llama_compiles_and_equals_its_packed_weights(capsys):
    model = tiny_llama(layers=2)
    original = copy.deepcopy(model)
    config = qcompile.calibrate(model, batches(), GPTQ_CONFIG)
    err = capsys.readouterr().err
    assert "qcompile.calibrate [" in err and "8/8" in err  # 4 stages a layer: q/k/v, o, gate/up, down
    names = [n for n, _ in model.named_parameters() if n.endswith("_proj.weight")]
    assert len(names) == 14 and all(is_released(model.get_parameter(n)) for n in names)
    assert not is_released(model.lm_head.weight)
    plans = []
    compiled = torch.compile(model, backend="qcompile",
                             options={"config": config, "inner": "eager", "on_plan": plans.append})
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(5))
    out = compiled(input_ids=ids).logits
    rows = [r for p in plans for r in p.rows if r.quantized]
    assert len(rows) == 14 and all(r.scheme.startswith("gptq") and "packed ahead" in r.release for r in rows)
    expected = dequantized_copy(original, model)(input_ids=ids).logits
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_calibration_improves_on_round_to_nearest_and_sequential_on_one_pass():
    original = tiny_llama(layers=2, seed=3)
    ids = batches(4, seed=9)
    reference = torch.cat([original(**b).logits.flatten() for b in ids])

    def error(model):
        compiled = torch.compile(model, backend="qcompile", options={"config": config, "inner": "eager"})
        out = torch.cat([compiled(**b).logits.flatten() for b in ids])
        torch._dynamo.reset()
        return float((out - reference).norm() / reference.norm())

    errors = {}
    for label, scheme, sequential in (("rtn", {"type": "affine", "bits": 3, "group_size": 32}, None),
                                      ("gptq", {"type": "gptq", "bits": 3, "group_size": 32, "sym": False}, True),
                                      ("gptq-one-pass", {"type": "gptq", "bits": 3, "group_size": 32, "sym": False},
                                       False)):
        model = copy.deepcopy(original)
        config = qcompile.QuantConfig.from_dict({**GPTQ_CONFIG, "default": scheme})
        if sequential is None:
            qcompile.quantize(model, config)
        else:
            qcompile.calibrate(model, batches(8), config, sequential=sequential, progress=False)
        errors[label] = error(model)
    assert errors["gptq"] < 0.9 * errors["rtn"]
    assert errors["gptq-one-pass"] < errors["rtn"]


@torch.no_grad()
def test_mixed_config_calibrates_only_gptq_and_packs_the_rest():
    model = MLP().eval()
    config = {"format": "qcompile", "version": 1, "default": {"type": "nf4"},
              "rules": [{"match": "fc2", "scheme": {"type": "gptq", "group_size": 32}},
                        {"match": "lm_head", "scheme": "skip"}]}
    result = qcompile.calibrate(model, [torch.randn(4, 64) for _ in range(3)], config, progress=False)
    assert cached_packed_weights(model.fc1.weight)[0].scheme.kind == "nf4"
    assert cached_packed_weights(model.fc2.weight)[0].scheme.kind == "gptq"
    assert not cached_packed_weights(model.lm_head.weight)
    compiled = torch.compile(model, backend="qcompile", options={"config": result, "inner": "eager"})
    assert torch.isfinite(compiled(torch.randn(2, 64))).all()


def test_inputs_as_tuples_and_tensors_and_errors_name_the_problem():
    model = MLP().eval()
    config = {"format": "qcompile", "version": 1, "default": {"type": "gptq", "group_size": 32}}
    with pytest.raises(ValueError, match="batches: empty"):
        qcompile.calibrate(model, [], config)
    with pytest.raises(ValueError, match="no scheme in it needs calibration"):
        qcompile.calibrate(model, [torch.randn(2, 64)], {"format": "qcompile", "version": 1,
                                                          "default": {"type": "nf4"}})
    qcompile.calibrate(model, [(torch.randn(2, 64),), torch.randn(3, 64)], config, progress=False)
    assert is_released(model.fc1.weight)


class TwoPaths(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 32)

    def forward(self, x, use_b: bool = False):
        return self.b(x) if use_b else self.a(x)


def test_a_weight_the_batches_never_reach_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"^b.weight: never run by the calibration batches"):
        qcompile.calibrate(TwoPaths(), [torch.randn(2, 32)],
                           {"format": "qcompile", "version": 1, "default": {"type": "gptq", "group_size": 32}})
