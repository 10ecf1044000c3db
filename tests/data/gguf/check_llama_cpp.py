"""Runs llama.cpp (through llama-cpp-python) on GGUF files the library wrote and compares its
logits with the library's: the base model, and the base with the adapter at scale 1 and 0.5.

    build/examples/gguf_export tests/data/models/tiny_llama out
    python3 -m venv /tmp/pyenv && /tmp/pyenv/bin/pip install llama-cpp-python numpy safetensors
    /tmp/pyenv/bin/python tests/data/gguf/check_llama_cpp.py out/base.gguf out/adapter.gguf out/logits.safetensors [TOL]

logits.safetensors holds input_ids (batch, T) int64 and the library's logits base, adapter and
adapter_half (batch·T, vocab) float32. Each sequence is decoded on its own from position 0, with
an F32 KV cache and flash attention off. Prints the max relative error of each (max |ours -
llama.cpp| / max |ours|) and exits 1 above TOL (1e-4).

GPT-2 needs a wider TOL: llama.cpp's CPU GELU rounds its input and output to F16 (a lookup table,
GGML_GELU_FP16 in ggml-cpu/vec.h), about 5e-4 relative per activation. transformers' GPT-2 with
its GELU's input and output rounded the same way is within 5e-5 of llama.cpp on these files.
"""
import ctypes
import sys

import llama_cpp as L
import numpy as np
from safetensors.numpy import load_file


def llama_cpp_logits(base_path: str, adapter_path: str, ids: np.ndarray, scales) -> dict:
    """llama.cpp's logits (batch·T, vocab) for ids with the adapter at each scale (0: none)."""
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(base_path.encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {base_path}")
    cp = L.llama_context_default_params()
    cp.n_ctx = max(64, ids.shape[1])
    cp.n_batch = cp.n_ctx
    cp.n_ubatch = cp.n_ctx
    cp.n_threads = cp.n_threads_batch = 1
    cp.type_k = cp.type_v = 0  # an F32 KV cache (the default F16 one rounds K and V)
    cp.flash_attn_type = 0  # disabled: the CPU flash attention works in F16
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    adapter = L.llama_adapter_lora_init(model, adapter_path.encode())
    if not adapter:
        raise RuntimeError(f"llama.cpp could not load the adapter {adapter_path}")

    def logits(scale: float) -> np.ndarray:
        if scale == 0:
            L.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            arr = (L.llama_adapter_lora_p * 1)(ctypes.cast(adapter, ctypes.c_void_p))
            sc = (ctypes.c_float * 1)(scale)
            L.llama_set_adapters_lora(ctx, ctypes.cast(arr, ctypes.POINTER(ctypes.POINTER(ctypes.c_void_p))), 1, sc)
        rows = []
        for seq in ids:
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            n = len(seq)
            batch = L.llama_batch_init(n, 0, 1)
            for i, t in enumerate(seq):
                batch.token[i] = int(t)
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = n
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for i in range(n):
                p = L.llama_get_logits_ith(ctx, i)
                rows.append(np.ctypeslib.as_array(p, shape=(vocab,)).copy())
            L.llama_batch_free(batch)
        return np.stack(rows)

    return {scale: logits(scale) for scale in scales}


def main() -> int:
    base_path, adapter_path, io_path = sys.argv[1:4]
    tol = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-4
    io = load_file(io_path)
    runs = (("base", 0.0), ("adapter", 1.0), ("adapter_half", 0.5))
    cpp = llama_cpp_logits(base_path, adapter_path, io["input_ids"], [s for _, s in runs])
    worst = 0.0
    for name, scale in runs:
        theirs = cpp[scale]
        ours = io[name].reshape(theirs.shape)
        err = float(np.abs(ours - theirs).max() / np.abs(ours).max())
        worst = max(worst, err)
        print(f"{name:13s} scale {scale:3.1f}: max relative error {err:.3e}")
    print(f"worst {worst:.3e}, tolerance {tol:.0e}: {'ok' if worst <= tol else 'FAILED'}")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
