"""The Textual terminal app: chat with a MoE model next to live expert-cache statistics.

`create_app(backend)` builds it (the CLI and the tests share it); `backends.open_backend` gives
a backend on the edgemoe engine or on stock llama.cpp.
"""
from edgemoe.tui.app import ChatApp, create_app, run_chat
from edgemoe.tui.backends import EngineChat, LlamaChat, open_backend
from edgemoe.tui.prompt import Sampling

__all__ = ["ChatApp", "EngineChat", "LlamaChat", "Sampling", "create_app", "open_backend", "run_chat"]
