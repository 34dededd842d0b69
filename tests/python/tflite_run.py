"""Runs an edgepack TFLite LLM with LiteRT's own interpreter (ai-edge-litert), the peer.

  tflite_run.py inspect MODEL
      signatures, their inputs/outputs (name, shape, dtype), file identifier, schema version,
      operator codes and metadata names, read with the wheel's own schema reader.
  tflite_run.py logits MODEL TOKENS_JSON PROMPT_LEN OUT
      prefill with tokens[:PROMPT_LEN] (padded to the prefill length), then decode the rest one
      token at a time; writes the logits of every real position as f32 [len(tokens), vocab].
  tflite_run.py chat MODEL QUESTION MAX_NEW
      reads tokenizer.json and the chat template from the model's metadata, formats the
      question as a user turn, decodes greedily, prints the reply.
  tflite_run.py call MODEL KEY INPUTS_JSON
      runs signature KEY with float32 inputs {name: nested list}; prints the outputs.
  tflite_run.py speed MODEL PROMPT_LEN N_DECODE [THREADS]
      time to first token, tokens/s of prefill and decode, and peak resident memory.
  tflite_run.py codes MODEL
      operator counts by builtin name or custom code, read with the wheel's schema reader only
      (for models with custom operators the interpreter cannot resolve, like Vela's ethos-u).

Prints one JSON object on its last line.
"""

import json
import sys
import time

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter


def read_model(path):
    with open(path, "rb") as f:
        data = f.read()
    return data, schema.Model.GetRootAsModel(data, 0)


def metadata(data, m):
    out = {}
    for i in range(m.MetadataLength()):
        md = m.Metadata(i)
        buf = m.Buffers(md.Buffer())
        if buf.DataLength() > 0:
            raw = buf.DataAsNumpy().tobytes()
        else:
            raw = data[buf.Offset() : buf.Offset() + buf.Size()]
        out[md.Name().decode()] = raw
    return out


def signatures(interp):
    sigs = {}
    for key in interp.get_signature_list():
        runner = interp.get_signature_runner(key)
        ins = runner.get_input_details()
        outs = runner.get_output_details()
        sigs[key] = {
            "inputs": {n: {"shape": d["shape"].tolist(), "dtype": np.dtype(d["dtype"]).name} for n, d in ins.items()},
            "outputs": {n: {"shape": d["shape"].tolist(), "dtype": np.dtype(d["dtype"]).name} for n, d in outs.items()},
        }
    return sigs


class Llm:
    def __init__(self, path, threads=2):
        self.interp = Interpreter(model_path=path, num_threads=threads)
        keys = list(self.interp.get_signature_list())
        self.prefill_key = next(k for k in keys if k.startswith("prefill_"))
        self.prefill = self.interp.get_signature_runner(self.prefill_key)
        self.decode = self.interp.get_signature_runner("decode")
        self.prefill_len = int(self.prefill_key.split("_")[1])
        ins = self.decode.get_input_details()
        self.cache = {
            n: np.zeros(d["shape"], dtype=d["dtype"]) for n, d in ins.items() if n.startswith("kv_cache_")
        }

    def run(self, runner, tokens, pos):
        out = runner(tokens=np.array([tokens], dtype=np.int32), input_pos=np.array(pos, dtype=np.int32), **self.cache)
        for n in self.cache:
            self.cache[n] = out[n]
        return out["logits"][0]

    def prompt(self, ids):
        """Prefill in chunks of the prefill length; logits of every real position."""
        rows = []
        at = 0
        while at < len(ids):
            chunk = ids[at : at + self.prefill_len]
            n = len(chunk)
            padded = chunk + [0] * (self.prefill_len - n)
            logits = self.run(self.prefill, padded, list(range(at, at + self.prefill_len)))
            rows.append(logits[:n])
            at += n
        return np.concatenate(rows)

    def step(self, token, pos):
        return self.run(self.decode, [token], [pos])[0]


def main():
    cmd = sys.argv[1]
    path = sys.argv[2]
    if cmd == "inspect":
        data, m = read_model(path)
        interp = Interpreter(model_path=path)
        codes = []
        for i in range(m.OperatorCodesLength()):
            c = m.OperatorCodes(i)
            codes.append({"deprecated": c.DeprecatedBuiltinCode(), "builtin": c.BuiltinCode(), "version": c.Version()})
        md = metadata(data, m)
        print(json.dumps({
            "identifier": data[4:8].decode(),
            "version": m.Version(),
            "signatures": signatures(interp),
            "operator_codes": codes,
            "metadata": sorted(md),
            "edgepack": json.loads(md.get("edgepack.json", b"{}")),
        }))
    elif cmd == "logits":
        ids = json.loads(sys.argv[3])
        p = int(sys.argv[4])
        llm = Llm(path)
        rows = [llm.prompt(ids[:p])]
        for i in range(p, len(ids)):
            rows.append(llm.step(ids[i], i)[None, :])
        logits = np.concatenate(rows).astype(np.float32)
        logits.tofile(sys.argv[5])
        print(json.dumps({"shape": list(logits.shape)}))
    elif cmd == "chat":
        from jinja2 import Environment
        from tokenizers import Tokenizer

        data, m = read_model(path)
        md = metadata(data, m)
        tok = Tokenizer.from_str(md["tokenizer.json"].decode())
        cfg = json.loads(md["tokenizer_config.json"])
        about = json.loads(md["edgepack.json"])
        template = Environment().from_string(about["chat_template"])
        text = template.render(
            messages=[{"role": "user", "content": sys.argv[3]}],
            add_generation_prompt=True,
            bos_token=cfg.get("bos_token", ""),
            eos_token=cfg.get("eos_token", ""),
        )
        ids = tok.encode(text, add_special_tokens=False).ids
        eos = about.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [eos]) | {tok.token_to_id(cfg.get("eos_token", ""))}
        llm = Llm(path)
        logits = llm.prompt(ids)[-1]
        out = []
        pos = len(ids)
        for _ in range(int(sys.argv[4])):
            t = int(np.argmax(logits))
            if t in eos:
                break
            out.append(t)
            logits = llm.step(t, pos)
            pos += 1
        print(json.dumps({"prompt_tokens": len(ids), "ids": out, "text": tok.decode(out)}))
    elif cmd == "call":
        interp = Interpreter(model_path=path)
        runner = interp.get_signature_runner(sys.argv[3])
        ins = {k: np.array(v, dtype=np.float32) for k, v in json.loads(sys.argv[4]).items()}
        out = runner(**ins)
        print(json.dumps({k: v.tolist() for k, v in out.items()}))
    elif cmd == "speed":
        import resource

        p, n = int(sys.argv[3]), int(sys.argv[4])
        llm = Llm(path, threads=int(sys.argv[5]) if len(sys.argv) > 5 else 2)
        ids = [(i * 7919 + 13) % 1000 for i in range(p)]
        # One untimed call of each signature: the first call allocates and plans.
        llm.prompt(ids)
        llm.step(0, p)
        for name in llm.cache:
            llm.cache[name][:] = 0
        t0 = time.perf_counter()
        logits = llm.prompt(ids)[-1]
        first = int(np.argmax(logits))
        t1 = time.perf_counter()
        token = first
        for i in range(n):
            token = int(np.argmax(llm.step(token, p + i)))
        t2 = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"ttft_ms": (t1 - t0) * 1e3, "prefill_tokens_per_s": p / (t1 - t0),
                          "decode_tokens_per_s": n / (t2 - t1), "peak_rss_mb": peak}))
    elif cmd == "codes":
        data, m = read_model(path)
        names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        counts = {}
        for g in range(m.SubgraphsLength()):
            sg = m.Subgraphs(g)
            for i in range(sg.OperatorsLength()):
                c = m.OperatorCodes(sg.Operators(i).OpcodeIndex())
                code = max(c.BuiltinCode(), c.DeprecatedBuiltinCode())
                name = c.CustomCode().decode() if c.CustomCode() else names.get(code, str(code))
                counts[name] = counts.get(name, 0) + 1
        print(json.dumps({"subgraphs": m.SubgraphsLength(), "ops": counts}))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
