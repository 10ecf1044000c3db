"""A PEFT adapter on the tiny Llama that targets lm_head, saved as PEFT saves it by default: with
save_embedding_layers="auto", PEFT adds the head's base weight (base_model.model.lm_head.
base_layer.weight) beside the LoRA factors. Writes tiny_llama/adapter_head/ (the adapter) and
tiny_llama/adapter_head_logits.safetensors (PEFT's logits for io.safetensors' input_ids, f32).

Usage: python3 make_head_adapter.py MODELS_DIR   (tests/data/models; torch, transformers 5.17, peft 0.21)
"""
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

d = os.path.join(sys.argv[1], "tiny_llama")
torch.manual_seed(0)
model = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                                        init_lora_weights=False))
peft.save_pretrained(os.path.join(d, "adapter_head"))
os.remove(os.path.join(d, "adapter_head", "README.md"))
ids = load_file(os.path.join(d, "io.safetensors"))["input_ids"]
with torch.no_grad():
    logits = peft(ids).logits.float().contiguous()
save_file({"logits": logits}, os.path.join(d, "adapter_head_logits.safetensors"))
