"""LoRA training with PEFT + torch on CPU, the peer of `cargo xtask bench finetune`: the same
model, data (JSONL question/answer pairs through the chat template, loss on the answers),
targets, rank, batch and step count as edgepack's run, one sample at a time with the step's
gradient normalised by its trained tokens, AdamW at transformers' defaults.

usage: peft_train.py BASE DATA OUT_DIR RANK ALPHA STEPS BATCH LR SEQ_LEN THREADS

Saves the adapter to OUT_DIR and prints JSON (also written to OUT_DIR/peer_report.json): tokens run, training seconds (model loading
excluded), tokens/s and the last step's loss."""
import json
import random
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

base, data, out = sys.argv[1:4]
rank, alpha, steps, batch = (int(x) for x in sys.argv[4:8])
lr, seq_len, threads = float(sys.argv[8]), int(sys.argv[9]), int(sys.argv[10])
torch.set_num_threads(threads)
torch.manual_seed(0)
random.seed(0)
tok = AutoTokenizer.from_pretrained(base)
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.05, target_modules=targets))
model.train()

samples = []
for line in open(data, encoding="utf-8"):
    if not line.strip():
        continue
    qa = json.loads(line)
    msgs = [{"role": "user", "content": qa["question"]}, {"role": "assistant", "content": qa["answer"]}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    before = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:seq_len]
    labels = [i if len(before) <= s else -100 for i, (s, _) in zip(ids, enc["offset_mapping"])]
    samples.append((ids, labels))

opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
tokens, loss_value, order = 0, 0.0, []
t0 = time.perf_counter()
for step in range(steps):
    if len(order) < batch:
        order = list(range(len(samples)))
        random.shuffle(order)
    chosen = [samples[order.pop()] for _ in range(batch)]
    n_labels = sum(sum(1 for x in lab[1:] if x != -100) for _, lab in chosen)
    total = 0.0
    for ids, labels in chosen:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        ce = torch.nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100, reduction="sum")
        (ce / n_labels).backward()
        total += ce.item()
        tokens += len(ids) - 1
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad()
    loss_value = total / n_labels
seconds = time.perf_counter() - t0
model.save_pretrained(out)
result = {"tokens": tokens, "train_seconds": seconds, "tokens_per_second": tokens / seconds, "last_loss": loss_value}
with open(f"{out}/peer_report.json", "w") as f:
    json.dump(result, f)
print(json.dumps(result))
