"""Weight quantization: RTN, GPTQ and APTQ mixed precision, packed into :class:`PackedLinear` layers.

``compactlm.quantize(model, GPTQ(bits=4, group_size=64), calib=ids)`` (an alias of ``compress``).
"""

from .aptq import APTQ
from .common import WeightQuantConfig, quant_summary
from .gptq import GPTQ, gptq_solve
from .rtn import RTN

__all__ = ["APTQ", "GPTQ", "RTN", "WeightQuantConfig", "gptq_solve", "quant_summary"]
