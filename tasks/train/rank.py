"""One training rank. Started by `tasks.train.launch` through torchrun or the deepspeed launcher, never
by hand:

    torchrun --nproc_per_node 2 -m tasks.train.rank --spec models/checkpoints/<run>/spec.json

Each rank builds the same GPT (same seed), wraps it in a DeepSpeed engine (ZeRO stage from the
config), and trains on windows drawn from the memmapped shards by a stateless sampler: the
windows of step s are a pure function of (seed, s), so the sampler's position is just the step,
and a resumed run sees exactly the data the uninterrupted one would have. Rank 0 appends one
JSON line per step to metrics.jsonl, which the launcher streams to MLflow.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tasks.atomic import MARKER, atomic_file, is_complete, write_json
from tasks.config import Settings
from tasks.data.sampler import TokenSampler
from tasks.data.shard import split_paths
from tasks.model.gpt import GPT, GPTConfig, load_weights
from tasks.train.curve import read_metrics


def lr_at(step: int, cfg) -> float:
    """Linear warmup to lr, then cosine down to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def ds_config(settings: Settings, world: int) -> dict[str, Any]:
    t = settings.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 1:
        # overlap_comm measured slower on CPU ranks (gloo): off
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=5e7,
                    allgather_bucket_size=5e7)
    if t.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=t.zero3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * world,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _complete_tags(ckpt_root: Path) -> list[Path]:
    return sorted((p for p in ckpt_root.glob("step_*") if is_complete(p)), key=lambda p: p.name)


def _gather_state(engine, stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (collective under ZeRO-3). The tied lm_head is left out."""
    import deepspeed

    def grab():
        return {k: v.detach().float().clone().contiguous() for k, v in engine.module.state_dict().items()
                if k != "lm_head.weight"}

    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            return grab() if rank == 0 else None
    return grab() if rank == 0 else None


def save_weights(state: dict[str, torch.Tensor], out_dir: Path, gpt_cfg: GPTConfig, meta: dict) -> None:
    from safetensors.torch import save_file

    with atomic_file(out_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(out_dir / "config.json", {"model": gpt_cfg.to_dict(), **meta})


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ce: torch.Tensor,
                 temperature: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, kd): Hinton et al.'s distillation loss. kd = T^2 * KL(softmax(t/T) || softmax(s/T)), mean
    over tokens (T^2 keeps its gradient scale independent of T); loss = alpha * kd + (1 - alpha) * ce."""
    import torch.nn.functional as F

    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kd = F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean() * temperature**2
    return alpha * kd + (1 - alpha) * ce, kd


def load_teacher(weights_dir: Path, device: torch.device) -> GPT:
    """The frozen teacher: its own config.json and safetensors weights, in eval mode, on this rank's
    device."""
    cfg = json.loads((weights_dir / "config.json").read_text())["model"]
    teacher = GPT(GPTConfig(**{**cfg, "activation_checkpointing": False}))
    load_weights(teacher, weights_dir / "model.safetensors")
    teacher.requires_grad_(False)
    return teacher.eval().to(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    # deepspeed launcher
    ap.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = ap.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    settings = Settings.model_validate(spec["settings"])
    t = settings.train
    run_dir = Path(spec["run_dir"])
    ckpt_root = run_dir / "ckpt"

    import deepspeed

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce (40-90 s of C++ on each machine and
        # virtualenv it has not seen) that only tensor-parallel inference calls (inference_all_reduce); ZeRO
        # training reduces through gloo. DeepSpeed keeps its probe's dict so that edits like this one hold.
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        torch.cuda.set_device(args.local_rank)
    threads = t.threads_per_rank or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)  # the deepspeed launcher does not set OMP_NUM_THREADS
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device("cuda", args.local_rank) if on_gpu else torch.device("cpu")

    gpt_cfg = GPTConfig(vocab_size=spec["vocab_size"], activation_checkpointing=t.activation_checkpointing,
                        **settings.model.model_dump())
    torch.manual_seed(settings.seed)  # identical initial weights on every rank
    model = GPT(gpt_cfg)

    # Resume: newest complete checkpoint. Same world size and stage: DeepSpeed state, bit-exact.
    # Otherwise: the consolidated fp32 weights only, with fresh optimizer moments (documented limit).
    tags = _complete_tags(ckpt_root) if spec["resume"] else []
    start_step, resume_mode = 0, "fresh"
    if tags:
        meta = json.loads((tags[-1] / "meta.json").read_text())
        if (meta["world_size"], meta["zero_stage"]) == (world, t.zero_stage):
            resume_mode = "exact"
        else:
            load_weights(model, tags[-1] / "model.safetensors")
            resume_mode = "weights_only"
        start_step = meta["step"]

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    engine, optimizer, _, _ = deepspeed.initialize(model=model.to(device), optimizer=optimizer,
                                                   config=ds_config(settings, world))
    if resume_mode == "exact":
        engine.load_checkpoint(str(ckpt_root), tag=tags[-1].name, load_lr_scheduler_states=False)
        from safetensors.torch import load_file

        torch.set_rng_state(load_file(str(tags[-1] / f"rng_rank{rank}.safetensors"))["cpu"])

    # Distillation: the teacher's logits are computed on the fly on the same windows (a forward pass
    # of a model a few times the student's size is cheaper here than reading V floats per token back
    # from disk, and nothing has to be invalidated when the teacher changes)
    kd_cfg = spec.get("teacher")
    teacher = load_teacher(Path(kd_cfg["weights_dir"]), device) if kd_cfg else None
    if teacher is not None and teacher.cfg.vocab_size != gpt_cfg.vocab_size:
        raise ValueError(f"teacher vocab {teacher.cfg.vocab_size} != student vocab {gpt_cfg.vocab_size}: "
                         "distill on the shards of the teacher's tokenizer")

    sampler = TokenSampler(split_paths(spec["manifest"], "train"), gpt_cfg.block_size, settings.seed)
    val_sampler = TokenSampler(split_paths(spec["manifest"], "val"), gpt_cfg.block_size, settings.seed,
                               salt=1)
    metrics_path = run_dir / "metrics.jsonl"
    tokens_per_step = t.micro_batch * t.grad_accum * world * gpt_cfg.block_size
    flops_per_step = gpt_cfg.flops_per_token() * tokens_per_step
    fail_at = int(os.environ.get("LLMOPS_TEST_CRASH_IN_CHECKPOINT", "0"))  # tests: die mid-checkpoint

    def evaluate(step: int, model=None) -> float:
        """Mean validation cross-entropy of the engine's model (or of `model`, the teacher) on fixed
        windows."""
        engine.eval()
        total = torch.zeros(1, device=device)
        with torch.no_grad():
            for b in range(t.eval_batches):
                x, y = val_sampler.batch(b, 0, rank, world, t.micro_batch, 1)
                total += (engine if model is None else model)(x.to(device), y.to(device))[1].float()
        dist.all_reduce(total)
        engine.train()
        return (total / (t.eval_batches * world)).item()

    def checkpoint(step: int) -> None:
        tag_dir = ckpt_root / f"step_{step:07d}"
        if rank == 0 and tag_dir.exists():
            shutil.rmtree(tag_dir)  # an incomplete attempt at this step from a crashed run
        dist.barrier()
        engine.save_checkpoint(str(ckpt_root), tag=tag_dir.name, save_latest=False,
                               client_state={"step": step, "sampler": {"step": step}})
        from safetensors.torch import save_file

        save_file({"cpu": torch.get_rng_state()}, str(tag_dir / f"rng_rank{rank}.safetensors"))
        if fail_at and step == fail_at and rank == 0:
            os._exit(17)  # a crash after DeepSpeed wrote its shards, before the checkpoint is complete
        state = _gather_state(engine, t.zero_stage, rank)
        dist.barrier()
        if rank == 0:
            save_weights(state, tag_dir, gpt_cfg, {"step": step})
            write_json(tag_dir / "meta.json", {"step": step, "world_size": world, "zero_stage": t.zero_stage,
                                               "sampler": {"step": step}, "config_hash": spec["config_hash"],
                                               "lineage": spec["lineage"]})
            with atomic_file(tag_dir / MARKER) as tmp:
                tmp.write_text("")
            for old in _complete_tags(ckpt_root)[:-t.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    if rank == 0:
        # drop what a crashed attempt logged past the checkpoint we resume from (and any torn line)
        kept = [r for r in read_metrics(metrics_path) if "event" in r or r["step"] <= start_step]
        with atomic_file(metrics_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"event": "start", "step": start_step, "resume": resume_mode,
                                "world_size": world, "zero_stage": t.zero_stage,
                                "threads_per_rank": threads}) + "\n")
    engine.train()
    teacher_val: float | None = None
    for step in range(start_step, t.max_steps):
        lr = lr_at(step, t)
        for g in engine.optimizer.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        loss_sum = torch.zeros(3, device=device)  # total, CE, KD
        for micro in range(t.grad_accum):
            x, y = sampler.batch(step, micro, rank, world, t.micro_batch, t.grad_accum)
            x, y = x.to(device), y.to(device)
            logits, ce = engine(x, y)
            loss, kd = ce, torch.zeros((), device=device)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(x, y)[0]
                loss, kd = distill_loss(logits, teacher_logits, ce, kd_cfg["temperature"], kd_cfg["alpha"])
            engine.backward(loss)
            engine.step()
            loss_sum += torch.stack((loss.detach().float(), ce.detach().float(), kd.detach().float()))
        dist.all_reduce(loss_sum)
        dt = time.perf_counter() - t0
        done = step + 1
        means = (loss_sum / (t.grad_accum * world)).tolist()
        row = {"step": done, "loss": means[0], "lr": lr,
               "grad_norm": float(engine.get_global_grad_norm() or 0.0), "step_s": dt,
               "tokens_per_s": tokens_per_step / dt}
        if spec.get("peak_flops"):
            row["mfu"] = flops_per_step / dt / spec["peak_flops"]
        if teacher is not None:
            row.update(ce_loss=means[1], kd_loss=means[2])
        if done % t.eval_every == 0 or done == t.max_steps:
            row["val_loss"] = evaluate(done)
            # the same windows, so the student's gap to its teacher is read off directly
            if teacher is not None:
                if teacher_val is None:  # a frozen teacher on fixed windows: one value for the whole run
                    teacher_val = evaluate(done, teacher)
                row["teacher_val_loss"] = teacher_val
        if rank == 0 and (done % t.log_every == 0 or done == t.max_steps or "val_loss" in row):
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if done % t.checkpoint_every == 0 or done == t.max_steps:
            checkpoint(done)

    dist.barrier()
    if rank == 0:
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"event": "end", "step": t.max_steps}) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
