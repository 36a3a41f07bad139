"""The transformers backend's prefix reuse on a GPU: exactness in fp32, speed in bf16.

    python benchmarks/bench_gpu_prefix.py [--tokenizer FOLDER]

Random Llama models with the embedded model's tokenizer (no weights to ship to the device):
a small fp32 one checks packed scoring and trie scoring against a plain forward per prompt,
and generation with and without the KV prefix cache (greedy and seeded sampling) over
three SL-like steps; a ~0.86B bf16 one times judge prompts shaped like the label stage's
(64 pairs × K = 4 × 2 orders: naive loop vs trie vs packed) and five SL-like steps on 32
prompts after a long few-shot head (plain vs prefix reuse). Without a GPU it runs tiny
sizes as a smoke test. Writes $OUT/gpu.json (benchmarks/results/gpu_prefix.json holds the
H200 run) and prints a one-line JSON summary last.
"""
import json
import os
import random
import shutil
import sys
import time

sys.path.insert(0, os.getcwd())
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from cai.backends.base import GenerationConfig, GenRequest  # noqa: E402
from cai.backends.hf import HFBackend, HFOptions  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/cai-bench-gpu")
TOKENIZER = sys.argv[sys.argv.index("--tokenizer") + 1] if "--tokenizer" in sys.argv else None
if TOKENIZER is None:
    from cai.core.models import local_path, parse_spec

    TOKENIZER = str(local_path(parse_spec("embedded:smollm2-135m")))
GPU = torch.cuda.is_available()
res = {"device": torch.cuda.get_device_name(0) if GPU else "cpu", "torch": torch.__version__}
sync = torch.cuda.synchronize if GPU else (lambda: None)
tok = AutoTokenizer.from_pretrained(TOKENIZER)


def build(path, hidden, layers, heads, kv, inter, dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    for f in os.listdir(TOKENIZER):
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(TOKENIZER, f), path)
    return path


def judge_seqs(n_pairs, k, rng):
    head = [rng.randrange(200, 20000) for _ in range(150)]
    seqs = []
    for _ in range(n_pairs):
        body = head + [rng.randrange(200, 20000) for _ in range(rng.randint(20, 40))]
        for _ in range(2):
            order = body + [rng.randrange(200, 20000) for _ in range(rng.randint(200, 260))]
            for _ in range(k):
                seqs.append(order + [rng.randrange(200, 20000) for _ in range(rng.randint(20, 40))])
    return seqs


def naive(b, seqs, tg):
    out = []
    with torch.no_grad():
        for s, t in zip(seqs, tg):
            lg = b.model(torch.tensor([s], device=b.device), logits_to_keep=1).logits[0, -1]
            out.append(torch.log_softmax(lg.float(), -1)[t].double().cpu().numpy())
    return np.array(out)


def timed(fn):
    sync()
    t = time.perf_counter()
    r = fn()
    sync()
    return r, time.perf_counter() - t


# 1. Exactness in fp32 on the GPU.
small = build("/tmp/small", 256, 4, 8, 4, 512, torch.float32)
rng = random.Random(0)
seqs = judge_seqs(6, 4, rng)
tg = [[65, 66]] * len(seqs)
packed = HFBackend(f"hf:{small}", small, HFOptions(progress=False, pack_tokens=300))
trie = HFBackend(f"hf:{small}", model=packed.model, tokenizer=packed.tok,
                 options=HFOptions(progress=False, scoring="trie"))
ref = naive(packed, seqs, tg)
res["fp32_packed_max_abs_diff"] = float(np.abs(packed.score_token_ids(seqs, tg) - ref).max())
res["fp32_trie_max_abs_diff"] = float(np.abs(trie.score_token_ids(seqs, tg) - ref).max())

shots = []
for i in range(5):
    shots += [{"role": "user", "content": f"Example question {i}: " + "word " * 120},
              {"role": "assistant", "content": f"Example answer {i}: " + "reply " * 100}]


def sl_steps(b, n, steps, cfg):
    chats = [shots + [{"role": "user", "content": f"Prompt number {i} about topic {i * 7}."}]
             for i in range(n)]
    texts = []
    for s in range(steps):
        outs = b.generate([GenRequest(c, "", i) for i, c in enumerate(chats)], cfg)
        texts.append([o.text for o in outs])
        chats = [c + [{"role": "assistant", "content": o.text},
                      {"role": "user", "content": f"Critique step {s}."}] for c, o in zip(chats, outs)]
    return texts


plain_s = HFBackend(f"hf:{small}", model=packed.model, tokenizer=packed.tok,
                    options=HFOptions(progress=False, prefix_cache_mb=0))
for temp in (0.0, 1.0):
    cfg = GenerationConfig(max_new_tokens=12, temperature=temp, seed=4)
    res[f"fp32_generation_equal_t{temp}"] = sl_steps(packed, 6, 3, cfg) == sl_steps(plain_s, 6, 3, cfg)

# 2. Throughput in bf16 on a ~1B random model.
big = (build("/tmp/big", 2048, 16, 16, 8, 5632, torch.bfloat16) if GPU
       else build("/tmp/big", 64, 2, 4, 2, 128, torch.bfloat16))
opts = dict(progress=False, dtype="bfloat16")
bp = HFBackend(f"hf:{big}", big, HFOptions(**opts, pack_tokens=4096))
bt = HFBackend(f"hf:{big}", model=bp.model, tokenizer=bp.tok, options=HFOptions(**opts, scoring="trie"))
res["params"] = sum(p.numel() for p in bp.model.parameters())
seqs = judge_seqs(64 if GPU else 3, 4, random.Random(1))
tg = [[65, 66]] * len(seqs)
bp.score_token_ids(seqs[:16], tg[:16])
naive_n = 64 if GPU else 4
(_, t_naive) = timed(lambda: naive(bp, seqs[:naive_n], tg[:naive_n]))
res["bf16_naive_prompts_per_s"] = round(naive_n / t_naive, 1)
for name, b in (("packed", bp), ("trie", bt)):
    _, t = timed(lambda b=b: b.score_token_ids(seqs, tg))
    res[f"bf16_{name}_prompts_per_s"] = round(len(seqs) / t, 1)
tot = sum(len(s) for s in seqs)
uniq = len({tuple(s[:i + 1]) for s in seqs for i in range(len(s))})
res["judge_ideal_speedup"] = round(tot / uniq, 3)
res["bf16_packed_of_ideal"] = round(res["bf16_packed_prompts_per_s"] / res["bf16_naive_prompts_per_s"]
                                    / res["judge_ideal_speedup"], 3)
bplain = HFBackend(f"hf:{big}", model=bp.model, tokenizer=bp.tok,
                   options=HFOptions(**opts, prefix_cache_mb=0, batch_size=32))
breuse = HFBackend(f"hf:{big}", model=bp.model, tokenizer=bp.tok, options=HFOptions(**opts, batch_size=32))
cfg = GenerationConfig(max_new_tokens=32, temperature=1.0, seed=1)
for name, b in (("plain", bplain), ("reuse", breuse)):
    _, t = timed(lambda b=b: sl_steps(b, 32 if GPU else 2, 5 if GPU else 2, cfg))
    res[f"bf16_sl5_{name}_s"] = round(t, 2)
res["bf16_sl5_reuse_speedup"] = round(res["bf16_sl5_plain_s"] / res["bf16_sl5_reuse_s"], 3)
os.makedirs(OUT, exist_ok=True)
with open(os.path.join(OUT, "gpu.json"), "w") as f:
    json.dump(res, f, indent=2)
print(json.dumps(res))
