"""The gateway: OpenAI-compatible HTTP in front of vLLM.

Request flow, one way: auth → limits → guided → proxy → metrics. Stages never import each other;
``gateway.pipeline`` composes them and ``gateway.app.build_app(config)`` wires the ASGI app.
"""
