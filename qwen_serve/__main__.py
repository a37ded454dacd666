"""``python -m qwen_serve`` → the ``qwen-serve`` command line."""

from qwen_serve.cli import main

raise SystemExit(main())
