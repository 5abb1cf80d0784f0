"""Quantized checkpoints in bitsandbytes' layout: :func:`save_quantized` and :func:`load_quantized`.

    qcompile.quantize(model, cfg)
    qcompile.save_quantized(model, "out")            # transformers + bitsandbytes can load "out"
    ...
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("out"))
    qcompile.load_quantized(model, "out")            # also loads what transformers' save_pretrained wrote
    model.forward = torch.compile(model.forward, backend="qcompile", options={"config": "out/config.json"})

The layout is the one ``save_pretrained`` writes for a model loaded with ``BitsAndBytesConfig``:

* safetensors files (``model.safetensors``, or ``model-00001-of-0000N.safetensors`` shards plus
  ``model.safetensors.index.json``: ``{"metadata": {"total_size": bytes}, "weight_map": {key: file}}``),
  with the header metadata ``{"format": "pt"}`` that transformers checks;
* a quantized linear ``m`` holds what ``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt`` put in their
  state dicts, under the module's name: 4-bit ``m.weight`` (the packed bytes viewed as the quant storage
  dtype, shape ``[(N*K+1)//2 // itemsize, 1]``), ``m.weight.absmax``, ``m.weight.quant_map``, with double
  quant ``m.weight.nested_absmax`` and ``m.weight.nested_quant_map``, and ``m.weight.quant_state.
  bitsandbytes__nf4`` (or ``__fp4``: a uint8 tensor holding the JSON of blocksize, original dtype and
  [N, K] shape, nested offset); LLM.int8() ``m.weight`` (int8 [N, K]), ``m.SCB`` (float32 [N], row absmax)
  and ``m.weight_format`` (0: row-major). transformers' ``Conv1D`` (GPT-2) stores its weight (in, out); its
  quantized form is the [out, in] one, as transformers quantizes ``weight.T``. A bias stays ``m.bias``;
* every other parameter and persistent buffer as ``state_dict()`` holds it; a tied weight once, under
  its first name (``model.embed_tokens.weight``, not ``lm_head.weight``), as transformers saves it.

For a transformers model ``config.json`` also carries ``quantization_config``, a ``BitsAndBytesConfig``
dict (all thirteen keys, as ``BitsAndBytesConfig.to_dict()`` writes them). transformers reads it to decide,
before loading any tensor, which modules become ``Linear4bit`` / ``Linear8bitLt``: every ``nn.Linear`` and
``Conv1D`` except those ``llm_int8_skip_modules`` names (a name matches a module when it equals the start
of its name up to a dot, or its end), with the 4-bit type, double quant, compute dtype and quant storage
of the config, or LLM.int8() with ``llm_int8_threshold``. The packed shapes, blocksize and nested state
come from each module's ``quant_state`` entry. So one config must describe every quantized linear (one
scheme) and the skip list names every linear left in float. The compute dtype is not in the tensors:
only the config records it. ``load_quantized`` reads the compute dtype (and the int8 threshold) from
there, and keys the packed forms by the scheme ``config.json``'s quantization_config plans, so the model
compiles with that config as is.
"""

from __future__ import annotations

from qcompile.checkpoint.load import load_quantized
from qcompile.checkpoint.save import save_quantized

__all__ = ["load_quantized", "save_quantized"]
