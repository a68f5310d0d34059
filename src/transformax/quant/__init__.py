"""Int8 (and weight-only packed int4) quantization: ``quantize`` a parameter pytree with a
recipe, and every ``nn.linear`` on a quantized weight runs a matmul kernel chosen per platform
(``explain`` says which and why; ``kernel([...])`` restricts the choice).

    from transformax import quant
    qparams = quant.quantize(params, "int8-dynamic")
    logits = gpt.apply(qparams, tokens, cfg)
"""

from transformax.quant.folder_data import folder_calibration
from transformax.quant.matmul import explain, matmul
from transformax.quant.qweight import QuantizedTable, QuantizedWeight
from transformax.quant.quantize import dequantize, quantize
from transformax.quant.recipe import RECIPES, Recipe
from transformax.quant.select import Kernel, kernel

__all__ = ["RECIPES", "Kernel", "QuantizedTable", "QuantizedWeight", "Recipe", "dequantize",
           "explain", "folder_calibration", "kernel", "matmul", "quantize"]
