"""Why llama.cpp's GPT-2 logits are ~1e-4 to 1e-3 from the library's: llama.cpp's CPU GELU rounds
its input and output to F16 (a lookup table; GGML_GELU_FP16 in ggml-cpu/vec.h). This runs
transformers' GPT-2 (with the PEFT adapter at scale 0, 1, 0.5) with its GELU rounded the same way
and compares it with llama.cpp on the GGUF files gguf_export wrote, and with the library's logits.

    build/examples/gguf_export tests/data/models/tiny_gpt2 out
    PYTHON tests/data/gguf/gpt2_f16_gelu.py tests/data/models/tiny_gpt2 out
PYTHON has torch, transformers, peft, safetensors and llama-cpp-python.
"""
import os
import sys

import numpy as np
import torch
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import GPT2LMHeadModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_llama_cpp import llama_cpp_logits  # noqa: E402


class F16Gelu(torch.nn.Module):
    """gelu_new on x rounded to F16, the result rounded to F16; 0 below -10, x above 10."""

    def forward(self, x):
        h = x.to(torch.float16).to(torch.float32)
        y = 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * (h + 0.044715 * h**3)))
        y = y.to(torch.float16).to(torch.float32)
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def transformers_logits(model_dir: str, ids: np.ndarray, scale: float) -> np.ndarray:
    m = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32)
    for block in m.transformer.h:
        block.mlp.act = F16Gelu()
    if scale:
        m = PeftModel.from_pretrained(m, os.path.join(model_dir, "adapter"))
        for mod in m.modules():
            if isinstance(getattr(mod, "scaling", None), dict):
                for k in mod.scaling:
                    mod.scaling[k] *= scale
    with torch.no_grad():
        out = m(torch.tensor(ids)).logits
    return out.reshape(-1, out.shape[-1]).numpy()


def main() -> int:
    model_dir, out = sys.argv[1:3]
    io = load_file(os.path.join(out, "logits.safetensors"))
    runs = (("base", 0.0), ("adapter", 1.0), ("adapter_half", 0.5))
    cpp = llama_cpp_logits(os.path.join(out, "base.gguf"), os.path.join(out, "adapter.gguf"), io["input_ids"], [s for _, s in runs])
    for name, scale in runs:
        hf = transformers_logits(model_dir, io["input_ids"], scale)
        ours = io[name].reshape(hf.shape)
        rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())  # noqa: E731
        print(f"{name:13s} llama.cpp vs transformers with F16 GELU {rel(cpp[scale], hf):.2e}; "
              f"vs the library (exact GELU) {rel(cpp[scale], ours):.2e}; F16-GELU transformers vs the library {rel(hf, ours):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
