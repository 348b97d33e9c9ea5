"""paradec: lossless parallel decoding for Hugging Face causal LMs.

import paradec
engine = paradec.load()                      # smollm2-135m-instruct, fetched on first use (~100 MB)
request = engine.request(
    messages=[{"role": "user", "content": "Write a Python function that adds two numbers."}],
    method="pld",
    max_new_tokens=64,
)                                            # checked here: a ParadecError names the bad value and its .param
result = engine.generate(request)
print(result.text, result.stats.tau)
"""

from paradec.config import SamplingParams
from paradec.decode import Generation, Result
from paradec.drafters import methods
from paradec.engine import Engine, load
from paradec.errors import ParadecError
from paradec.metrics import GenerationStats
from paradec.request import Request

__all__ = [
    "Engine",
    "Generation",
    "GenerationStats",
    "ParadecError",
    "Request",
    "Result",
    "SamplingParams",
    "load",
    "methods",
]
__version__ = "0.1.0"
