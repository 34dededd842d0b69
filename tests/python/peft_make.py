"""Creates a PEFT LoRA adapter on a base HF folder with PEFT itself (random, non-zero updates),
saves it, and saves PEFT's own merge_and_unload() result as the reference.

usage: peft_make.py BASE ADAPTER_OUT MERGED_OUT VARIANT [SEED]
       peft_make.py --many BASE ADAPTER_OUT MERGED_OUT VARIANT SEED [BASE ... SEED ...]
(--many: several adapters in one process, each as a call of its own would make it)
variants: plain, rslora, dora, patterns, modules_to_save, all_linear, layers, embed"""
import json
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def make(base, adapter_out, merged_out, variant, seed):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    cfg = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
               init_lora_weights=False)
    if variant == "rslora":
        cfg.update(use_rslora=True)
    elif variant == "dora":
        cfg.update(use_dora=True)
    elif variant == "patterns":
        cfg.update(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 4},
                   alpha_pattern={"v_proj": 32})
    elif variant == "modules_to_save":
        cfg.update(target_modules=["q_proj", "up_proj"], modules_to_save=["model.norm"])
    elif variant == "all_linear":
        cfg.update(target_modules="all-linear")
    elif variant == "layers":
        cfg.update(target_modules=["gate_proj", "up_proj"], layers_to_transform=[1])
    elif variant == "embed":
        cfg.update(target_modules=["embed_tokens", "q_proj"])
    elif variant == "regex":
        cfg.update(target_modules=r".*\.layers\.0\..*(q_proj|v_proj)")
    elif variant != "plain":
        raise SystemExit(f"unknown variant {variant}")
    peft_model = get_peft_model(model, LoraConfig(**cfg))
    # init_lora_weights=False gives random A and B; shrink B so the update is a realistic few
    # percent of the base weights.
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.mul_(0.05)
            if "modules_to_save" in n:
                p.add_(0.01 * torch.randn_like(p))
    peft_model.save_pretrained(adapter_out, safe_serialization=True)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(merged_out, safe_serialization=True)


if sys.argv[1:2] == ["--many"]:
    jobs = sys.argv[2:]
    if not jobs or len(jobs) % 5:
        raise SystemExit(__doc__)
    for k in range(0, len(jobs), 5):
        make(*jobs[k:k + 4], int(jobs[k + 4]))
    print(json.dumps({"ok": True, "variants": jobs[3::5]}))
else:
    variant = sys.argv[4]
    make(*sys.argv[1:5], int(sys.argv[5]) if len(sys.argv) > 5 else 0)
    print(json.dumps({"ok": True, "variant": variant}))
