"""By-hand check of PPO's ZeRO-3 frozen-model placement (DeepSpeed is not in cai's install).

    pip install deepspeed
    torchrun --nproc_per_node 2 benchmarks/zero3_frozen_check.py [--offload none|cpu]

Each process wraps the same random 2-layer Llama the way `cai.train.placement` wraps PPO's
reference and preference model under `zero3.yaml` (an inference-only stage-3 engine), then
compares the response log-probs PPO reads from it with those of the whole model. Prints one
JSON line (process 0): the share of the parameters each process holds and the largest
|Δ logp|; exit 1 when they differ by more than 1e-5 or a process holds the whole model, 2
without DeepSpeed. Without a GPU it
runs on the CPU (DeepSpeed's CPU accelerator, gloo); its first run there compiles a small
DeepSpeed op, which takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--offload", choices=("none", "cpu"), default="none",
                    help="zero3.yaml's offload_param_device")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("zero3_frozen_check: DeepSpeed is not installed (pip install deepspeed)",
              file=sys.stderr)
        return 2
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from cai.train.placement import Parallelism, local_fraction, place, plan
    from cai.train.ppo import response_forward

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)

    def model() -> LlamaForCausalLM:
        torch.manual_seed(0)  # the same weights in every process and both copies
        return LlamaForCausalLM(cfg).eval()

    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = response_forward(model().to(device), ids, mask, 6, 1.0)["logp"]
    # The DeepSpeed config accelerate builds from zero3.yaml, its "auto"s unfilled.
    ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
          "bf16": {"enabled": False},
          "zero_optimization": {"stage": 3, "offload_param": {"device": args.offload},
                                "offload_optimizer": {"device": "none"},
                                "stage3_gather_16bit_weights_on_model_save": True}}
    p = Parallelism(dist.get_world_size(), "zero3", args.offload != "none", ds)
    engine = place(model(), plan(p), p, device)
    with torch.no_grad():
        got = response_forward(engine, ids, mask, 6, 1.0)["logp"]
    diff = (got.float() - want.float()).abs().max().item()
    row = {"processes": p.processes, "placement": plan(p), "device": device.type,
           "deepspeed": deepspeed.__version__, "torch": torch.__version__,
           "share_here": round(local_fraction(engine), 4), "max_abs_dlogp": diff}
    if dist.get_rank() == 0:
        print(json.dumps(row))
    dist.destroy_process_group()
    return 0 if diff <= 1e-5 and row["share_here"] < 1 else 1


if __name__ == "__main__":
    sys.exit(main())
