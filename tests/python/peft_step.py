"""One LoRA training step with PEFT + torch, the reference edgepack's trainer is held to.

usage: peft_step.py BASE ADAPTER DATA LR OUT.safetensors

Loads BASE (an HF folder, f32) with the PEFT adapter ADAPTER as trainable, tokenizes DATA
(JSONL question/answer pairs) with the tokenizer's own chat template, taking the loss on the
assistant's tokens only (the span the template adds between the generation prompt and the end
of the turn), computes the mean cross-entropy over every trained token of the whole file as one
batch, backpropagates, and takes one torch.optim.AdamW step (transformers' defaults, no
clipping). Writes the gradients (`<name>.grad`) and the updated weights (`<name>`) under PEFT's
parameter names, and prints {"loss", "label_tokens"} as JSON."""
import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

base, adapter, data, lr, out = sys.argv[1:6]
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
model.train()
for m in model.modules():
    if isinstance(m, torch.nn.Dropout):
        m.p = 0.0

samples = []
for line in open(data, encoding="utf-8"):
    if not line.strip():
        continue
    qa = json.loads(line)
    msgs = [{"role": "user", "content": qa["question"]}, {"role": "assistant", "content": qa["answer"]}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    before = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert full.startswith(before)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [i if len(before) <= s < len(full) else -100 for i, (s, _) in zip(ids, enc["offset_mapping"])]
    samples.append((ids, labels))

n_labels = sum(sum(1 for x in lab[1:] if x != -100) for _, lab in samples)
total = 0.0
for ids, labels in samples:
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    target = torch.tensor(labels[1:])
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    (ce / n_labels).backward()
    total += ce.item()

params = {n: p for n, p in model.named_parameters() if p.requires_grad}
tensors = {}
for n, p in params.items():
    tensors[n + ".grad"] = p.grad.detach().clone().contiguous()
opt = torch.optim.AdamW(params.values(), lr=float(lr), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
opt.step()
for n, p in params.items():
    tensors[n] = p.detach().clone().contiguous()
save_file(tensors, out)
print(json.dumps({"loss": total / n_labels, "label_tokens": n_labels, "params": len(params)}))
