"""Reads GGUF files the library wrote with gguf-py (llama.cpp's own Python reader) and checks what
llama.cpp needs of them: the architecture and type keys, and for an adapter, lora_a / lora_b pairs
whose shapes chain (lora_a ne {in, r}, lora_b ne {r, out}) and adapter.lora.alpha; for a model,
the <arch>.block_count blocks' tensors. Prints one line per file; exits 1 on any problem.

    PYTHON -m pip install gguf numpy
    PYTHON tests/data/gguf/read_with_gguf_py.py out/base.gguf out/adapter.gguf
"""
import sys

from gguf import GGUFReader


def field(r: GGUFReader, key: str):
    f = r.get_field(key)
    return None if f is None else f.contents()


def check(path: str) -> list:
    r = GGUFReader(path)
    problems = []
    arch, kind = field(r, "general.architecture"), field(r, "general.type")
    tensors = {t.name: t for t in r.tensors}
    if arch not in ("llama", "gpt2"):
        problems.append(f"general.architecture is {arch!r}")
    if kind == "adapter":
        if field(r, "adapter.type") != "lora" or not field(r, "adapter.lora.alpha"):
            problems.append("adapter.type / adapter.lora.alpha missing")
        for name, a in tensors.items():
            if name.endswith(".lora_a"):
                b = tensors.get(name[:-1] + "b")
                # gguf-py's shape is ne: lora_a {in, r}, lora_b {r, out}
                if b is None or int(a.shape[1]) != int(b.shape[0]):
                    problems.append(f"{name}: no lora_b, or r differs")
        if len(tensors) == 0 or len(tensors) % 2:
            problems.append(f"{len(tensors)} tensors")
    elif kind == "model":
        blocks = field(r, f"{arch}.block_count")
        for i in range(blocks or 0):
            if f"blk.{i}.attn_norm.weight" not in tensors:
                problems.append(f"blk.{i}.attn_norm.weight missing")
        if "token_embd.weight" not in tensors:
            problems.append("token_embd.weight missing")
    else:
        problems.append(f"general.type is {kind!r}")
    print(f"{path}: {arch} {kind}, {len(tensors)} tensors, {len(r.fields)} keys: {'ok' if not problems else problems}")
    return problems


if __name__ == "__main__":
    sys.exit(1 if sum(len(check(p)) for p in sys.argv[1:]) else 0)
