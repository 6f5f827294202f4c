"""Layer-by-layer execution for compression: calibration activations move through the model one
decoder layer at a time (GPTQ-style), so a checkpoint larger than RAM can be compressed.

The dense path is the engine's own (edgemoe/arch/*.py) over a temporary GGUF of the dense
tensors only, exactly as the mixed-precision calibration (converters/calibration.py) does; a
layer's routed experts are read from the HF checkpoint when the layer is reached and dropped
after it, so peak memory is the dense weights + activations + the experts of the layers in
flight (one, or T for the KT-reception field).
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgemoe.converters.compress.moe_view import MoELayer, moe_output, streamed_layer
from edgemoe.converters.extended import ExpertSource

Key = tuple[int, int]


@dataclass
class Stream:
    """The engine's dense model and the token windows pushed through it."""
    model: object                     # edgemoe.arch model over the dense-only GGUF
    experts: dict[Key, ExpertSource]  # (layer, expert) -> checkpoint source
    windows: list[list[int]]
    bounds: np.ndarray                # window w spans rows bounds[w]:bounds[w + 1] of the activations
    kv: object
    tokenizer: object                 # the checkpoint's tokenizer (edgemoe.tokenizer.Tokenizer)
    window: int                       # tokens per window (at most the model's context length)

    @property
    def n_layers(self) -> int:
        return len(self.model.layers)

    def moe_indices(self) -> list[int]:
        return sorted({layer for layer, _ in self.experts})

    def tokenize(self, text, n_tokens: int) -> list[list[int]]:
        """Windows of another text (a CalibrationText), cut as this stream's own windows were."""
        from edgemoe.converters.calibration import token_windows

        return token_windows(self.tokenizer, text, n_tokens, self.window)

    def embed(self, n_windows: int | None = None) -> torch.Tensor:
        """[N, D] embeddings of the first n_windows windows, back to back."""
        return torch.cat([self.model.embed(w) for w in self.windows[:n_windows]])

    def attention(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] plus layer's attention, each window attending within itself from position 0."""
        from edgemoe.layers import rms_norm

        attn_norm, attn = self.model.layers[layer][:2]
        out = x.clone()
        n = x.shape[0]
        for a, b in zip(self.bounds[:-1], self.bounds[1:]):
            if a >= n:
                break
            out[a:b] += attn(rms_norm(x[a:b], attn_norm, self.model.args.eps), self.kv, 0)
        return out

    def ffn_input(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        from edgemoe.layers import rms_norm

        return rms_norm(x, self.model.layers[layer][2], self.model.args.eps)

    def ffn(self, layer: int, xn: torch.Tensor, moe: MoELayer | None, drop: tuple[int, ...] = ()) -> torch.Tensor:
        """The layer's FFN output for xn [N, D]: routed experts of `moe` (minus `drop`) plus any
        shared expert, or the dense FFN of a dense layer."""
        from edgemoe.moe import SharedExpertMoE

        ffn = self.model.layers[layer][3]
        if moe is None:
            return ffn(xn)
        y = moe_output(moe, xn, drop)
        if isinstance(ffn, SharedExpertMoE):
            y += ffn.shared_part(xn)
        return y

    def load_moe(self, layer: int) -> MoELayer:
        """Layer's router (from the dense GGUF) and all its experts (from the checkpoint), float32."""
        from edgemoe.moe import SharedExpertMoE

        ffn = self.model.layers[layer][3]
        block = ffn.moe if isinstance(ffn, SharedExpertMoE) else ffn
        ids = sorted(e for l, e in self.experts if l == layer)
        f, d = self.experts[(layer, ids[0])].shapes["gate"]
        gate_up, down = torch.empty(len(ids), 2 * f, d), torch.empty(len(ids), d, f)
        for slot, e in enumerate(ids):  # one matrix in flight: no second copy of the layer
            src = self.experts[(layer, e)]
            gate_up[slot, :f] = torch.from_numpy(src.load("gate"))
            gate_up[slot, f:] = torch.from_numpy(src.load("up"))
            down[slot] = torch.from_numpy(src.load("down"))
        cfg = block.cfg
        return streamed_layer(layer, block.router.float(), gate_up, down, cfg.top_k, cfg.normalize, cfg.scale,
                              cfg.gating)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        from edgemoe.layers import rms_norm

        return self.model.output(rms_norm(x, self.model.norm, self.model.args.eps))


@contextlib.contextmanager
def open_stream(conv, text, n_tokens: int, window: int, n_threads: int | None = None, work_dir=None):
    """Yield a Stream over `conv`'s checkpoint and `text` (n_tokens in windows of `window`)."""
    from edgemoe.arch import model_class
    from edgemoe.converters.calibration import _write_dense, token_windows
    from edgemoe.converters.extended import split_plan
    from edgemoe.gguf_file import GGUFFile
    from edgemoe.native.backend import CpuBackend
    from edgemoe.tokenizer import Tokenizer

    dense, experts = split_plan(conv.plan())
    with tempfile.TemporaryDirectory(dir=work_dir, prefix=".edgemoe-compress-") as tmp:
        path = Path(tmp) / "dense.gguf"
        _write_dense(conv, dense, path)
        model_file = GGUFFile(path)
        window = min(window, int(model_file.arch_field("context_length", window)))
        tokenizer = Tokenizer(path)
        windows = token_windows(tokenizer, text, n_tokens, window)
        backend = CpuBackend(n_threads)
        try:
            model = model_class(model_file.arch)(model_file, backend, None)
            bounds = np.cumsum([0] + [len(w) for w in windows])
            yield Stream(model, experts, windows, bounds, model.new_kv(max(len(w) for w in windows)), tokenizer, window)
        finally:
            backend.close()
