"""edgemoe's native layer: ggml's public C API (from llama-cpp-python's shared libraries) via ctypes."""
