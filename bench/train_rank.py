"""One rank of bench/train.py: time training steps of a GPT in one mode; rank 0 writes a JSON result.

    torchrun --nproc_per_node 2 bench/train_rank.py --mode zero2 --size small --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tasks.model.gpt import GPT, GPTConfig  # noqa: E402

SIZES = {
    "tiny": dict(n_layer=4, n_head=4, d_model=128, block_size=128, vocab_size=2048),
    "small": dict(n_layer=6, n_head=6, d_model=384, block_size=256, vocab_size=8192),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["plain", "ddp", "zero0", "zero1", "zero2", "zero3"], required=True)
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    a = ap.parse_args()

    distributed = a.mode != "plain"
    if a.mode.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    elif distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    cfg = GPTConfig(**SIZES[a.size])
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    if a.mode.startswith("zero"):
        import deepspeed

        stage = int(a.mode[-1])
        zero = {"stage": stage}
        if stage:
            zero.update(overlap_comm=False, contiguous_gradients=True)
        if stage == 3:
            zero["stage3_param_persistence_threshold"] = 1000
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config={
            "train_micro_batch_size_per_gpu": a.batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "zero_optimization": zero, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})

        def step(x, y):
            loss = engine(x, y)[1]
            engine.backward(loss)
            engine.step()
    else:
        net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

        def step(x, y):
            loss = net(x, y)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(rank)
    times = []
    for i in range(a.warmup + a.steps):
        x = torch.randint(0, cfg.vocab_size, (a.batch, cfg.block_size), generator=g)
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        step(x, x)
        if distributed:
            dist.barrier()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024],
                       dtype=torch.float64)  # MiB
    if distributed:
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        step_s = statistics.median(times)
        tokens = a.batch * cfg.block_size * world
        Path(a.out).write_text(json.dumps({
            "mode": a.mode, "size": a.size, "world": world, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "flops_per_s": cfg.flops_per_token() * tokens / step_s,
            "params": cfg.n_params(non_embedding=False), "peak_rss_mib_per_rank": rss.item()}))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
