"""qwen-serve: a serving layer around vLLM for the Qwen2.5 family.

Public API (everything else is private to its module):

* :func:`load_config` / :class:`Config` – the YAML config (``qwen_serve.config``).
* :func:`build_plan` / :class:`Plan` – config → validated vLLM launch (``qwen_serve.plan``).
* :func:`build_app` – the gateway ASGI app (``qwen_serve.gateway.app``), importable without vLLM.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
