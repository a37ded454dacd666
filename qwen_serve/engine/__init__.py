"""The engine side: launch vLLM from a :class:`~qwen_serve.plan.Plan`, watch its health, restart or
exit on crash, stop it on drain. Importable without vLLM installed (the engine is a subprocess)."""

from qwen_serve.engine.state import EngineMonitor, EngineState
from qwen_serve.engine.supervisor import EngineStartError, EngineSupervisor

__all__ = ["EngineMonitor", "EngineStartError", "EngineState", "EngineSupervisor"]
