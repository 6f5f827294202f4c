"""`--max-memory CAP` on generate/chat: the largest expert budget whose memory plan fits the cap.

The plan is tune's (edgemoe/tune/cost_model.py MemoryPlan): runtime + dense weights + budget +
KV cache + slack. For the engine, runtime, dense and KV bytes are measured the way `edgemoe tune`
measures them (an engine opened at full budget, nothing loaded). For the llama backend the
runtime is this process's RSS before the model opens, dense bytes come from the file and the KV
cache is llama.cpp's f16 one from the file's attention sizes; llama.cpp's compute buffers fall
in the slack.
"""
from __future__ import annotations

from edgemoe.errors import InputError
from edgemoe.gguf_file import GGUFFile
from edgemoe.tune.cost_model import MemoryPlan

F16_BYTES = 2


def llama_kv_bytes(model: GGUFFile, n_ctx: int) -> int:
    """llama.cpp's default KV cache (f16 K and V for every layer and position)."""
    n_layer = int(model.arch_field("block_count", 0))
    n_embd = int(model.arch_field("embedding_length", 0))
    n_head = int(model.arch_field("attention.head_count", 1) or 1)
    n_head_kv = int(model.arch_field("attention.head_count_kv", n_head) or n_head)
    key = int(model.arch_field("attention.key_length", n_embd // n_head))
    value = int(model.arch_field("attention.value_length", n_embd // n_head))
    return n_layer * n_ctx * n_head_kv * (key + value) * F16_BYTES


def memory_plan(path, backend: str, n_ctx: int) -> MemoryPlan:
    if backend == "edgemoe":
        from edgemoe.tune.runs import run_facts

        facts = run_facts(str(path), n_ctx, isolated=True)
        return MemoryPlan(facts.runtime_bytes, facts.dense_bytes, facts.kv_bytes)
    import llama_cpp  # noqa: F401  (the runtime is loaded before its RSS is read)

    from edgemoe.memory import current_rss_bytes

    model = GGUFFile(path)
    dense = sum(t.nbytes for t in model.tensors.values() if not t.is_expert)
    return MemoryPlan(current_rss_bytes(), dense, llama_kv_bytes(model, n_ctx))


def budget_for_cap(path, cap_bytes: int, backend: str, n_ctx: int) -> tuple[int, MemoryPlan]:
    """(expert budget, the plan it came from): the cap less the plan's fixed bytes, at most every
    expert; InputError when not even the backend's smallest budget fits."""
    from edgemoe.expert_store import find_experts

    specs = find_experts(GGUFFile(path))
    if not specs:
        raise InputError(f"{path} has no routed experts: --max-memory has no expert budget to choose")
    plan = memory_plan(path, backend, n_ctx)
    if backend == "llama":
        from edgemoe.llama_budget import budget_range

        smallest, total = budget_range(path)
    else:
        total, smallest = sum(s.alloc_bytes for s in specs.values()), max(s.alloc_bytes for s in specs.values())
    budget = min(plan.max_budget(cap_bytes), total)
    if budget < smallest:
        raise InputError(f"--max-memory {cap_bytes / 2**20:.0f} MiB is too small for {path}: even the smallest "
                         f"expert budget needs {plan.need_bytes(smallest) / 2**20:.0f} MiB "
                         f"({plan.explain(smallest)}); raise --max-memory")
    return budget, plan
