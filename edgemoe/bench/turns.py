"""Time to first token of each turn of a chat, with and without KV prefix reuse.

The chat re-encodes the whole conversation every turn; with reuse the backend prefills only
what the new turn adds. Runs alternate reuse off / on, `repeats` times each, on one backend per
mode (opened once), and report the median per turn:

    python -m edgemoe.bench.turns [MODEL.gguf] [--backend edgemoe|llama] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from edgemoe.commands.common import model_path
from edgemoe.engine import EngineConfig
from edgemoe.tui.backends import open_backend
from edgemoe.tui.prompt import Conversation, Sampling, build_prompt

# paragraphs in the demo's own domain (stdlib documentation), so replies run on past EOS rarely
USER_TURNS = (
    "This module provides a portable way of using operating system dependent functionality. "
    "If you just want to read or write a file see open(), if you want to manipulate paths, see",
    "Return a list of the words in the string, using sep as the delimiter string. If maxsplit is "
    "given, at most maxsplit splits are done, so the list will have at most",
    "The json module exposes an API familiar to users of the standard library marshal and pickle "
    "modules. Encoding basic Python object hierarchies is done with",
    "Open file and return a corresponding file object. If the file cannot be opened, an OSError is "
    "raised. The mode is an optional string that specifies",
    "This module implements specialized container datatypes providing alternatives to the built-in "
    "containers dict, list, set, and tuple. A deque is",
)


def chat_ttft(backend, sampling: Sampling, turns=USER_TURNS) -> list[tuple[float, int, int]]:
    """Per turn: (seconds from building the prompt to the first token, prompt tokens, reused tokens)."""
    conversation, out = Conversation(), []
    # a fresh chat: leave the backend's KV cache holding a token the conversation does not start with
    # (the previous run's conversation would otherwise make turn 1 a prefix hit)
    list(backend.stream(backend.vocab.encode("\n", True, False), Sampling(0.0, 1.0, 1)))
    for text in turns:
        conversation.add("user", text)
        start = time.perf_counter()
        prompt = build_prompt(conversation, backend.vocab, backend.info.n_ctx - sampling.max_tokens)
        stream = backend.stream(prompt.ids, sampling)
        first = next(stream)
        out.append((time.perf_counter() - start, first.prompt_tokens, first.kv_reused_tokens))
        reply = first.text + "".join(e.text for e in stream)
        conversation.add("assistant", reply)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, nargs="?", default=None, help=".gguf file (default: the demo model)")
    p.add_argument("--backend", choices=["edgemoe", "llama"], default="edgemoe")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("-n", "--max-tokens", type=int, default=48, help="tokens per reply (default 48, greedy)")
    p.add_argument("--ctx", type=int, default=512)
    args = p.parse_args(argv)
    path = model_path(args.model)
    config, sampling = EngineConfig(n_ctx=args.ctx), Sampling(0.0, 1.0, args.max_tokens)
    backends = {reuse: open_backend(path, args.backend, config, reuse_kv=reuse) for reuse in (False, True)}
    runs: dict[bool, list[list[tuple[float, int, int]]]] = {False: [], True: []}
    try:
        for _ in range(args.repeats):
            for reuse, backend in backends.items():
                runs[reuse].append(chat_ttft(backend, sampling))
    finally:
        for backend in backends.values():
            backend.close()
    print(f"{path.name}, backend {args.backend}, {args.repeats} interleaved runs per mode; TTFT median (min) in ms")
    print("turn  prompt tokens  prefilled off/on  TTFT reuse off   TTFT reuse on")
    for t in range(len(USER_TURNS)):
        off, on = ([run[t] for run in runs[r]] for r in (False, True))
        prompt_tokens = on[0][1]

        def ms(xs) -> str:
            return f"{statistics.median(x[0] for x in xs) * 1e3:7.1f} ({min(x[0] for x in xs) * 1e3:6.1f})"
        print(f"{t + 1:>4}  {prompt_tokens:>13}  {prompt_tokens - off[0][2]:>7}/{prompt_tokens - on[0][2]:<8}  "
              f"{ms(off)}  {ms(on)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
