#!/bin/sh
# Converts the tiny checkpoints' PEFT adapters with llama.cpp's own converter, for test_gguf:
# tiny_llama_adapter.gguf is the reference save_gguf_adapter must match (names, shapes, values,
# alpha). LLAMA_CPP is a llama.cpp source tree (convert_lora_to_gguf.py, gguf-py; e.g. the one
# vendored in llama-cpp-python's sdist); PYTHON has torch, transformers, safetensors, numpy.
#   PYTHON=/tmp/pyenv/bin/python LLAMA_CPP=/path/to/llama.cpp sh tests/data/gguf/make_adapters.sh
set -e
here=$(cd "$(dirname "$0")" && pwd)
models="$here/../models"
"$PYTHON" "$LLAMA_CPP/convert_lora_to_gguf.py" "$models/tiny_llama/adapter" --base "$models/tiny_llama" \
  --outfile "$here/tiny_llama_adapter.gguf" --outtype f32
