"""GGUFFile's own header walk: every value as gguf-py's reader gives it (the oracle), and a
Qwen-sized vocabulary costs no memory to hold (gguf-py keeps a numpy view per array item)."""
from __future__ import annotations

import gc

import gguf
import numpy as np
import pytest

from edgemoe.gguf_file import GGUFFile, ModelFileError
from edgemoe.memory import current_rss_bytes

N_VOCAB = 151_936  # Qwen2/Qwen3's vocabulary


def _write(path, n_vocab: int = N_VOCAB, alignment: int | None = None) -> None:
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    if alignment:
        if alignment & (alignment - 1):  # the writer refuses such a value: store the key as a crafted file would
            w.add_uint32("general.alignment", alignment)
        else:
            w.add_custom_alignment(alignment)
    w.add_block_count(0)
    w.add_uint32("qwen3moe.expert_count", 128)
    w.add_float32("qwen3moe.rope.freq_base", 1e6)
    w.add_bool("qwen3moe.flag", True)
    w.add_int64("test.negative", -5)
    w.add_string("general.name", "größe")
    w.add_array("test.floats", [0.5, 1.5, -2.0])
    w.add_array("test.empty", [])
    w.add_token_list([f"tok{i}".encode() for i in range(n_vocab)])
    w.add_token_types([1 + i % 3 for i in range(n_vocab)])
    w.add_tensor("token_embd.weight", np.arange(64 * 8, dtype=np.float32).reshape(8, 64))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "vocab.gguf"
    _write(path)
    return path


def test_every_field_and_tensor_as_gguf_py_reads_them(vocab_file):
    model, reader = GGUFFile(vocab_file), gguf.GGUFReader(vocab_file, "r")
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert model.keys() == keys
    for key in keys:
        want, got = reader.fields[key].contents(), model.field(key)
        assert got == want and type(got) is type(want), key
    assert model.field("general.name") == "größe"
    assert model.array_length("tokenizer.ggml.tokens") == N_VOCAB
    assert model.raw_field("tokenizer.ggml.tokens")[7] == b"tok7"
    for t in reader.tensors:
        info = model.tensors[t.name]
        assert (info.offset, info.nbytes, info.shape) == (int(t.data_offset), int(t.n_bytes),
                                                         tuple(reversed(t.shape.tolist())))
        assert np.array_equal(model.data(t.name), np.asarray(t.data).view(np.uint8).ravel())


def test_custom_alignment_places_tensors_as_gguf_py(tmp_path):
    path = tmp_path / "aligned.gguf"
    _write(path, n_vocab=10, alignment=4096)
    model, reader = GGUFFile(path), gguf.GGUFReader(path, "r")
    assert model.alignment == 4096
    assert [model.tensors[t.name].offset for t in reader.tensors] == [int(t.data_offset) for t in reader.tensors]
    assert all(model.tensors[t.name].offset % 4096 == 0 for t in reader.tensors)


def test_a_qwen_vocabulary_costs_no_memory_to_hold(vocab_file):
    gc.collect()
    before = current_rss_bytes()
    model = GGUFFile(vocab_file)
    grown = current_rss_bytes() - before
    # gguf-py's reader holds ~300 MiB for this file's 2 x 151,936 array items
    assert grown < 32 * 2**20, f"opening grew RSS by {grown / 2**20:.0f} MiB"
    assert model.field("tokenizer.ggml.token_type")[:4] == [1, 2, 3, 1]


def test_alignment_not_a_power_of_two_is_refused(tmp_path):
    path = tmp_path / "bad.gguf"
    _write(path, n_vocab=10, alignment=48)
    with pytest.raises(ModelFileError, match="general.alignment = 48 is not a power of two"):
        GGUFFile(path)


def test_alignment_of_another_type_is_refused(tmp_path):
    """llama.cpp reads general.alignment with its u32 getter, which aborts on another type."""
    path = tmp_path / "typed.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(0)
    w.add_uint64("general.alignment", 32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="general.alignment has value type 10, not uint32"):
        GGUFFile(path)
