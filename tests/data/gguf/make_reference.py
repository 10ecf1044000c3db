"""Writes reference.gguf with gguf-py (llama.cpp's own GGUF writer), for test_gguf: every
metadata value type, scalars and arrays, and tensors in F32, F16, BF16 and Q8_0 (raw bytes).
test_gguf reads it and writes the same content with GgufBuilder, byte for byte.

    python3 -m venv /tmp/pyenv && /tmp/pyenv/bin/pip install gguf numpy
    /tmp/pyenv/bin/python tests/data/gguf/make_reference.py
"""
import os

import numpy as np
from gguf import GGUFWriter, GGMLQuantizationType, GGUFValueType

here = os.path.dirname(os.path.abspath(__file__))
w = GGUFWriter(os.path.join(here, "reference.gguf"), arch="llama")
w.add_uint8("test.u8", 200)
w.add_int8("test.i8", -100)
w.add_uint16("test.u16", 60000)
w.add_int16("test.i16", -30000)
w.add_uint32("test.u32", 4000000000)
w.add_int32("test.i32", -2000000000)
w.add_float32("test.f32", 0.1)
w.add_bool("test.bool", True)
w.add_string("test.string", "héllo, GGUF")
w.add_uint64("test.u64", 2**63 + 5)
w.add_int64("test.i64", -(2**62))
w.add_float64("test.f64", 1.0 / 3.0)
w.add_array("test.strings", ["a", "", "ccc"])
w.add_array("test.i32s", [1, -2, 3])
w.add_array("test.f32s", [0.5, -1.25])
w.add_key_value("test.u8s", [1, 2, 255], GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT8)

x = (np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5) / 3.0  # (rows 2, cols 3): ne = [3, 2]
w.add_tensor("blk.0.attn_q.weight", x)
w.add_tensor("f16", np.array([1.0, -2.5, 65504.0, 1e-4], dtype=np.float16))
bf16 = (np.array([1.0, -0.15625, 3.0e38], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
w.add_tensor("bf16", bf16, raw_dtype=GGMLQuantizationType.BF16)
q8 = np.arange(34, dtype=np.uint8)  # one Q8_0 block (32 values) as raw bytes
w.add_tensor("q8", q8.reshape(1, 34), raw_dtype=GGMLQuantizationType.Q8_0)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
