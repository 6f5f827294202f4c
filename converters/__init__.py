"""HF checkpoint reading, GGUF writing, quantization, and (later) compression."""
