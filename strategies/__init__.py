"""Flower server side: XPerTStrategy (``xpert``), its pLLM store (``pllm_server``), the ServerApp
(``server_app``) and the results folder it writes (``results``). The message contract shared with
devices is the package ``protocol``, one layer below (``[tool.importlinter]`` in pyproject.toml)."""
