"""Flower server side: XPerTStrategy (``xpert``), its pLLM store (``pllm_server``), the ServerApp
(``server_app``) and the message contract shared with devices (``protocol``)."""
