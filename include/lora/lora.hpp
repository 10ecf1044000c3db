// One include for everything: #include <lora/lora.hpp> and link lora::lora.
#pragma once

#include <lora/attention.hpp>
#include <lora/combine.hpp>
#include <lora/config.hpp>
#include <lora/dropout.hpp>
#include <lora/embedding.hpp>
#include <lora/error.hpp>
#include <lora/gguf.hpp>
#include <lora/init.hpp>
#include <lora/layers.hpp>
#include <lora/linear.hpp>
#include <lora/lora_model.hpp>
#include <lora/loss.hpp>
#include <lora/models/encoder.hpp>
#include <lora/module_map.hpp>
#include <lora/optim.hpp>
#include <lora/parameter.hpp>
#include <lora/peft.hpp>
#include <lora/peft_config.hpp>
#include <lora/safetensors.hpp>
#include <lora/svd.hpp>
#include <lora/training_checkpoint.hpp>
#include <lora/types.hpp>
