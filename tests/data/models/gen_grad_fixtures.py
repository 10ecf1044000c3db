"""Training references from the real stack: loss and LoRA gradients of PEFT models, in float64.

Usage: python3 gen_grad_fixtures.py MODELS_DIR   (tests/data/models; torch, transformers 5.17, peft 0.21)
For tiny_llama and tiny_gpt2 (their f32 adapter/), and for a third shape made here,
tiny_llama_gqa1 (one KV head, llama3 rope scaling, tied embeddings, attention and MLP biases), writes
DIR/grads.safetensors:
  input_ids, attention_mask (right padding in sequence 0: its last 2 tokens), position_ids
  (cumsum(mask) - 1), labels (-100 on the pads and on one more token), loss (1,), and per LoRA module
  "<module path>.lora_A" / ".lora_B": the gradient of the loss (transformers' ForCausalLM loss).
Everything runs in float64 (eager attention), except where transformers' Llama itself computes in
float32 whatever the model's dtype: RMSNorm, the attention softmax and the rotary inverse frequencies
and cos/sin tables. For Llama folders a second file, grads_f64.safetensors, records the same with
all three computed in float64 (transformers' own rope_init functions, run with torch.float meaning
float64), so a double implementation of the same math can match it to rounding.
"""
import os, sys, json
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

root = sys.argv[1]
torch.manual_seed(0)


def make_gqa1(d):
    """A Llama of another shape, with a random PEFT adapter, saved like the other folders."""
    os.makedirs(d, exist_ok=True)
    cfg = LlamaConfig(vocab_size=48, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=8, max_position_embeddings=32,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16},
                      attn_implementation="eager")
    torch.manual_seed(11)
    model = LlamaForCausalLM(cfg).double().eval()
    model.save_pretrained(d, safe_serialization=True)
    pm = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                          lora_dropout=0.0))
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    pm.save_pretrained(os.path.join(d, "adapter"))


class _Float64Torch:
    """torch, except that torch.float is float64: runs transformers' rope_init code in float64."""
    float = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def float64_llama_islands():
    """RMSNorm, the eager attention softmax and the rotary tables in float64 instead of float32."""
    import transformers.models.llama.modeling_llama as ml
    import transformers.modeling_rope_utils as ru

    def rms(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k = ml.repeat_kv(key, module.num_key_value_groups)
        v = ml.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.nn.functional.softmax(w, dim=-1)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    def rope(self, x, position_ids):
        saved = ml.torch, ru.torch
        ml.torch = ru.torch = _Float64Torch()
        try:
            init = self.compute_default_rope_parameters if self.rope_type == "default" else ru.ROPE_INIT_FUNCTIONS[self.rope_type]
            inv_freq, scaling = init(self.config, None)
        finally:
            ml.torch, ru.torch = saved
        assert inv_freq.dtype == torch.float64 and x.dtype == torch.float64
        freqs = position_ids[:, :, None].to(torch.float64) * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * scaling, emb.sin() * scaling

    ml.LlamaRMSNorm.forward = rms
    ml.eager_attention_forward = eager
    ml.LlamaRotaryEmbedding.forward = rope


def record(d, out_name="grads.safetensors"):
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").double().eval()
    pm = PeftModel.from_pretrained(model, os.path.join(d, "adapter"), is_trainable=True).double()
    assert all(p.dtype == torch.float64 for p in pm.parameters())
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(0, vocab, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[0, 6:] = 0  # right padding: no query has all its keys hidden
    ids[0, 6:] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = ids.clone()
    labels[0, 6:] = -100
    labels[1, 3] = -100
    logits = pm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    # transformers' ForCausalLMLoss (shift, ignore -100, mean over counted tokens), here in float64:
    # transformers itself casts the logits to float32 first.
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="mean")
    check = pm(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss
    assert abs(check.item() - loss.item()) < 1e-5, (check.item(), loss.item())
    loss.backward()
    tensors = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels,
               "loss": loss.detach().reshape(1)}
    for n, p in pm.named_parameters():
        if "lora_" in n and p.grad is not None:
            # base_model.model.<module>.lora_A.default.weight -> <module>.lora_A
            module = n[len("base_model.model."):].replace(".default.weight", "")
            tensors[module] = p.grad.detach().contiguous()
    save_file(tensors, os.path.join(d, out_name))
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    print(d, out_name, "loss", repr(loss.item()), "tensors", len(tensors))


make_gqa1(os.path.join(root, "tiny_llama_gqa1"))
for name in ["tiny_llama", "tiny_gpt2", "tiny_llama_gqa1"]:
    record(os.path.join(root, name))
float64_llama_islands()
for name in ["tiny_llama", "tiny_llama_gqa1"]:
    record(os.path.join(root, name), "grads_f64.safetensors")
