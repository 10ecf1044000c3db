"""Converts the tiny checkpoints with llama.cpp's own convert_hf_to_gguf.py, for test_gguf:
<model>_model.gguf is the reference save_gguf_model must match (tensor names, shapes, types and
bytes; the architecture's keys). The checkpoints carry no tokenizer, which the converter insists
on; this runs it with every set_vocab replaced by its tokenizer-less one (tokenizer.ggml.model
"none"). GPT-2's converter reads n_ctx, which transformers 5 no longer writes: a copy of the
folder gets n_ctx = n_positions, as the original gpt2 config.json has.

    PYTHON tests/data/gguf/make_models.py LLAMA_CPP
LLAMA_CPP is a llama.cpp source tree (convert_hf_to_gguf.py, conversion/, gguf-py; e.g. the one
vendored in llama-cpp-python's sdist); PYTHON has torch, transformers, safetensors, numpy,
sentencepiece.
"""
import json
import os
import runpy
import shutil
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
models = os.path.join(here, "..", "models")
llama_cpp = os.path.abspath(sys.argv[1])
sys.path.insert(0, llama_cpp)
sys.path.insert(1, os.path.join(llama_cpp, "gguf-py"))
import conversion.base as base  # noqa: E402
import conversion.gpt2 as gpt2  # noqa: E402
import conversion.llama as llama  # noqa: E402

for cls in (base.TextModel, llama.LlamaModel, gpt2.GPT2Model):
    cls.set_vocab = lambda self: self._set_vocab_none()


def convert(model_dir: str, out: str) -> None:
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", "f32"]
    runpy.run_path(os.path.join(llama_cpp, "convert_hf_to_gguf.py"), run_name="__main__")


with tempfile.TemporaryDirectory() as tmp:
    for name in ("tiny_llama", "tiny_llama_gqa1", "tiny_gpt2"):
        src = os.path.join(models, name)
        if name == "tiny_gpt2":
            src = os.path.join(tmp, name)
            os.makedirs(src)
            shutil.copy(os.path.join(models, name, "model.safetensors"), src)
            with open(os.path.join(models, name, "config.json")) as f:
                config = json.load(f)
            config["n_ctx"] = config["n_positions"]
            with open(os.path.join(src, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
        convert(src, os.path.join(here, f"{name}_model.gguf"))
