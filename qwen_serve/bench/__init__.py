"""``qwen-serve bench``: a load generator and report for OpenAI-compatible LLM servers.

Packages by concern: ``arrivals`` (when requests are due), ``workloads`` (what they say),
``client`` (sending at the scheduled time, per-event timestamps), ``stats`` (percentiles, goodput,
intervals), ``run`` (run/sweep/compare orchestration), ``report`` (result.json, JSONL/CSV, PNG,
HTML), ``stub`` (the trivial upstream ``bench ceiling`` measures the client against).
"""
