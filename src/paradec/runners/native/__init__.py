"""The native fast path for Llama-family models: our own Transformer, a static KV cache and CUDA graphs.

`supports(config)` / `unsupported_reason(config)` tell the runner factory whether a config.json dict can run here
exactly; `NativeRunner.from_pretrained(path, device=..., dtype=...)` loads one.
"""

from paradec.runners.native.batch import BatchedNativeRunner
from paradec.runners.native.model import supports, unsupported_reason
from paradec.runners.native.runner import NativeRunner

__all__ = ["BatchedNativeRunner", "NativeRunner", "supports", "unsupported_reason"]
