"""The training loop, readable top to bottom (nanoGPT style): the configuration arrives resolved
(:mod:`fewshifts.train.config`), and :func:`train` does everything else in order: processes, resume,
model, data, optimizer, the step loop, records.

Exactness: the batch at (epoch, index) depends only on the seed, the learning rate only on the step,
and a checkpoint holds weights, optimizer, RNG and running metrics, so ``--resume`` continues a run
bit-identically (CPU). Under DDP only rank 0 writes anything; ranks agree on stopping every step.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

import fewshifts.models  # noqa: F401  (registers the models)
from fewshifts.data import build_loader, dataset_info
from fewshifts.layers import (
    freeze_shifts,
    normalize_shift_grads_,
    param_groups,
    shift_layers,
    shift_penalty,
    shift_sparsity,
)
from fewshifts.models import save_model
from fewshifts.models.common import count_params_madds
from fewshifts.models.io import MODEL_FILE
from fewshifts.train.checkpoint import list_checkpoints, load_for_resume, save_checkpoint
from fewshifts.train.config import (
    at_step,
    build_model,
    check_keys,
    coerce_numbers,
    model_arguments,
    refuses_shift,
    validate,
)
from fewshifts.train.records import MetricsLog, Progress, format_time, percent, summary_line, write_summary

__all__ = ["train", "evaluate", "StopTraining"]


class StopTraining(Exception):
    """The run stopped early (signal, NaN loss, ``stop_at``); ``code`` is the process exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def train(cfg: dict | None = None, resume: str | os.PathLike | None = None, overrides: dict | None = None) -> dict:
    """Train with a resolved config, or resume checkpoint/run ``resume`` with ``overrides``; return the summary."""
    timer_start = time.perf_counter()
    # ------------------------------------------------------------------ processes and device
    rank, world, device = setup_distributed(cfg["device"] if cfg else (overrides or {}).get("device", "auto"))
    master = rank == 0
    try:
        # -------------------------------------------------------------- resume: the checkpoint's config wins
        weights, state = None, None
        if resume is not None:
            ckpt, weights, state = load_for_resume(resume)
            cfg = {**state["config"], **(overrides or {})}
            check_keys(overrides or {}, "command line")
            cfg = coerce_numbers(cfg)
            validate(cfg)
            cfg["out"] = str(ckpt.parent.parent)
        out = Path(cfg["out"] or f"runs/{cfg.get('preset') or cfg['model']}-{datetime.now():%Y%m%d-%H%M%S}")
        cfg["out"] = str(out)
        if master and state is None and list_checkpoints(out):
            raise ValueError(f"{out} already holds a run; continue it with --resume or pick another --out")
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        # -------------------------------------------------------------- model
        torch.manual_seed(cfg["seed"])
        in_chans, _, image_size = dataset_info(cfg["dataset"])
        try:
            model = build_model(cfg)
        except TypeError as exc:
            kwargs = model_arguments(cfg)
            hint = ("; for a model without a shift argument pass --shift null (shift: null in YAML)"
                    if "shift" in kwargs and refuses_shift(exc) else "")
            raise ValueError(f"model {cfg['model']!r} does not take the arguments {kwargs} ({exc}){hint}") from exc
        if weights is not None:
            model.load_state_dict(weights)
        model.to(device)
        check_onednn_layout(model, cfg, device)
        if cfg["channels_last"]:
            model.to(memory_format=torch.channels_last)
        # -------------------------------------------------------------- data
        data_kw = dict(device=device, data_dir=cfg["data_dir"], seed=cfg["seed"], rank=rank, world=world,
                       channels_last=cfg["channels_last"], workers=cfg["workers"])
        train_loader = build_loader(cfg["dataset"], True, cfg["batch_size"], subset=cfg["subset"],
                                    color_jitter=cfg["color_jitter"], **data_kw)
        test_loader = build_loader(cfg["dataset"], False, cfg["eval_batch_size"], subset=cfg["eval_subset"], **data_kw)
        per_epoch = len(train_loader)
        total = cfg["steps"] or cfg["epochs"] * per_epoch
        epochs = math.ceil(total / per_epoch)
        milestones = [at_step(m, total) for m in cfg["milestones"]]
        warmup, freeze_at, stop_at = (at_step(cfg[k], total) for k in ("warmup", "freeze_shifts_at", "stop_at"))
        if hasattr(train_loader, "dataset"):  # ImageNet: colour distortion withdrawn for the last epochs
            train_loader.dataset.jitter_epochs = math.ceil(at_step(cfg["color_jitter_until"], total) / per_epoch)
        # -------------------------------------------------------------- optimizer (no decay on shifts/BN/bias)
        groups = param_groups(model, cfg["weight_decay"], cfg["shift_lr"])
        for g in groups:
            g["base_lr"] = g.get("lr", cfg["lr"])
        optimizer = torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"])
        scaler = torch.amp.GradScaler(device.type, enabled=cfg["precision"] == "fp16")
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if cfg["precision"] == "bf16" else torch.float16)
                    if cfg["precision"] != "fp32" else contextlib.nullcontext())
        step, elapsed_before = 0, 0.0
        running = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count this epoch
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            if master:  # the saved sums are over all ranks: count them once
                running.copy_(state["running"])
            step, elapsed_before = state["step"], state["elapsed_s"]
        if freeze_at is not None and step >= freeze_at:
            freeze_shifts(model)
        net = wrap(model, cfg, world, device)
        # -------------------------------------------------------------- records (rank 0 only)
        if master:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        metrics = MetricsLog(out, cfg["tensorboard"], resume_step=step) if master else None
        progress = Progress(total, per_epoch, enabled=master)
        if master:
            note = f" (resumed at step {step})" if step else ""
            progress.log(f"training {cfg['model']} on {cfg['dataset']}: {total} steps = {total / per_epoch:g} epochs "
                         f"of {per_epoch} x {cfg['batch_size']} images, {world} process(es) on {device}{note} -> {out}")

        def checkpoint(at: int) -> Path | None:
            """Save on rank 0 (called on every rank: the running metrics are summed over ranks first)."""
            sums = all_reduce(running.clone(), world)
            if not master:
                return None
            return save_checkpoint(out, at, model, dict(
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=get_rng_state(), running=sums.cpu(),
                config=cfg, elapsed_s=elapsed_before + time.perf_counter() - timer_start), cfg["keep_checkpoints"])

        # -------------------------------------------------------------- signals: finish the step, checkpoint, exit
        caught: list[int] = []
        handlers = install_signal_handlers(caught)
        lam, p = float(cfg["shift_penalty"]), int(cfg["penalty_p"])
        first_step, last_saved, batches = step, None, None
        t_window, n_window = time.perf_counter(), 0
        eval_result: tuple[float, float] | None = None
        try:
            while step < total:
                epoch, index = divmod(step, per_epoch)
                if batches is None or index == 0:
                    batches = iter(train_loader.batches(epoch, index))
                    progress.start_epoch(epoch, epochs, step)
                    t_epoch, steps_in_epoch = time.perf_counter(), 0
                if freeze_at is not None and step == freeze_at:
                    freeze_shifts(model)
                    net = wrap(model, cfg, world, device)  # DDP must not wait for gradients that never come
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * lr_factor(cfg["schedule"], step, total, milestones, cfg["gamma"], warmup)
                x, y = next(batches)
                with autocast:
                    logits = net(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg["label_smoothing"])
                total_loss = loss
                if lam > 0 and not (freeze_at is not None and step >= freeze_at):
                    total_loss = loss + lam * shift_penalty(model, p)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total_loss).backward()
                # every rank learns whether any rank saw a non-finite loss or a signal, before updating
                flags = torch.tensor([float(not torch.isfinite(total_loss)), float(bool(caught))], device=device)
                if world > 1:
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                if flags[0] > 0:
                    good = list_checkpoints(out)
                    raise StopTraining(f"loss is not finite at step {step + 1} (epoch {epoch + 1}); stopped without "
                                       f"updating. Last good checkpoint: {good[0] if good else 'none'}", 1)
                if cfg["normalized_shift_grad"]:
                    scaler.unscale_(optimizer)
                    normalize_shift_grads_(model)
                scaler.step(optimizer)
                scaler.update()
                with torch.no_grad():
                    running += torch.stack([loss.detach().double() * len(y),
                                            (logits.argmax(1) == y).sum().double(),
                                            torch.tensor(len(y), dtype=torch.float64, device=device)])
                step += 1
                steps_in_epoch += 1
                n_window += len(y) * world
                if master and (step % cfg["log_every"] == 0 or step == total):
                    now = time.perf_counter()
                    stats = running_stats(running, model)
                    stats["img_per_s"] = n_window / max(now - t_window, 1e-9)
                    eta = (now - timer_start) / (step - first_step) * (total - step)
                    progress.update(step, stats, eta)
                    metrics.scalars(step, {"train/loss": stats["loss"], "train/acc": stats["acc"],
                                           "train/img_per_s": stats["img_per_s"], "lr": optimizer.param_groups[0]["lr"],
                                           **({"shifts/sparsity": stats["sparsity"]} if stats["sparsity"] is not None
                                              else {})})
                    t_window, n_window = now, 0
                if step % per_epoch == 0 or step == total:  # ------------------------------ epoch end
                    progress.end_epoch()
                    sums = all_reduce(running.clone(), world)
                    with torch.no_grad():
                        penalty = float(shift_penalty(model, p))
                    row = dict(epoch=epoch + 1, step=step, lr=optimizer.param_groups[0]["lr"],
                               train_loss=float(sums[0] / sums[2]), train_acc=float(sums[1] / sums[2]),
                               sparsity=model_sparsity(model), penalty=penalty,
                               img_per_s=steps_in_epoch * cfg["batch_size"] / (time.perf_counter() - t_epoch),
                               elapsed_s=elapsed_before + time.perf_counter() - timer_start)
                    if step == total or (cfg["eval_every"] and (epoch + 1) % cfg["eval_every"] == 0):
                        eval_result = evaluate(model, test_loader, world, autocast)
                        row["test_loss"], row["test_acc"] = eval_result
                    running.zero_()
                    if master:
                        metrics.epoch(row)
                        test = f" test acc {100 * row['test_acc']:.2f}%" if "test_acc" in row else ""
                        progress.log(f"epoch {epoch + 1}/{epochs} step {step}: train loss {row['train_loss']:.4f} "
                                     f"acc {100 * row['train_acc']:.2f}%{test} sparsity {percent(row['sparsity'])}"
                                     f" [{format_time(row['elapsed_s'])}]")
                    last_saved = checkpoint(step)
                elif cfg["ckpt_every"] and step % cfg["ckpt_every"] == 0:
                    last_saved = checkpoint(step)
                if flags[1] > 0 or step == stop_at:
                    if last_saved is None or not last_saved.name.endswith(f"{step:08d}"):
                        last_saved = checkpoint(step)
                    why = f"signal {signal.Signals(caught[0]).name}" if caught else f"stop_at={stop_at}"
                    code = 128 + caught[0] if caught else 0
                    raise StopTraining(f"stopped at step {step}/{total} ({why}); checkpoint {last_saved}; "
                                       f"continue with: fewshifts train --resume {out}", code)
        finally:
            restore_signal_handlers(handlers)
            progress.end_epoch()
            if metrics is not None:
                metrics.close()
        # -------------------------------------------------------------- final evaluation and records
        sync_buffers(model, world)
        if eval_result is None or first_step == total:
            eval_result = evaluate(model, test_loader, world, autocast)
        identical = check_ranks_identical(model, world)
        summary = None
        if master:
            wall = elapsed_before + time.perf_counter() - timer_start
            summary = dict(
                model=cfg["model"], model_spec=model.model_spec, dataset=cfg["dataset"], preset=cfg.get("preset"),
                test_acc=eval_result[1], test_loss=eval_result[0], test_images=len(test_loader.labels)
                if hasattr(test_loader, "labels") else len(test_loader.dataset),
                sparsity=model_sparsity(model),
                layer_sparsity={name: m.sparsity() for name, m in shift_layers(model)},
                params=sum(t.numel() for t in model.parameters()),
                madds=int(count_params_madds(model, (in_chans, image_size, image_size), device)[1]),
                wall_time_s=wall, steps=total, epochs=total / per_epoch, world_size=world, device=str(device),
                precision=cfg["precision"], backend=os.environ.get("FEWSHIFTS_BACKEND", "auto"),
                ranks_identical=identical, run_dir=str(out),
            )
            save_model(model, out / MODEL_FILE, extra=dict(
                dataset=cfg["dataset"], data_dir=cfg["data_dir"], test_acc=summary["test_acc"],
                eval_subset=cfg["eval_subset"],
                eval_batch_size=cfg["eval_batch_size"], steps=total))
            write_summary(out / "summary.json", summary)
            print(summary_line(summary), flush=True)
        if world > 1:  # no rank tears its process group down while rank 0 still writes the records
            dist.barrier()
        return summary or {}
    finally:
        if world > 1 and dist.is_initialized():
            net = None  # the DDP wrapper goes before the process group (teardown_distributed)
            teardown_distributed()


def teardown_distributed() -> None:
    """Destroy the process group once nothing else holds it (call after dropping the DDP wrapper).

    DDP's reducer holds the process group, and Python frees a reducer with the GIL held. Were it the group's last
    holder, the group's destructor would join gloo's worker threads with the GIL held, while a worker, freeing a
    finished collective whose tensors Python had dropped, waits for the GIL to free their Python objects: a
    deadlock (2 of 15 two-process runs of the DDP test under load hung after writing their records, 0 of 45 since).
    Collected first, the reducer leaves the group to ``destroy_process_group``, whose release of the group's Python
    object drops the GIL."""
    gc.collect()  # the DDP wrapper and its reducer, also from reference cycles
    dist.destroy_process_group()


# ---------------------------------------------------------------------- helpers used by the loop above
def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device should be auto, cpu, cuda or cuda:N instead of {device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} is not available: PyTorch sees no CUDA GPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def onednn_unsafe_convs(model: nn.Module) -> list[str]:
    """Strided 1x1 convolutions with fewer than 16 input channels per group. oneDNN's channels_last
    backward-weights kernel for them writes past its workspace on x86 CPUs (IC < 8 with AVX2, < 16 with
    AVX-512; uxlfoundation/oneDNN#6035), corrupting the heap: a crash or a silently wrong gradient."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
            and max(m.stride) > 1 and m.in_channels // m.groups < 16]


def check_onednn_layout(model: nn.Module, cfg: dict, device: torch.device) -> None:
    """Keep CPU training off the oneDNN bug of :func:`onednn_unsafe_convs`: ``--channels-last`` is refused with
    the layers named, and ``--compile`` keeps the model's NCHW layout (inductor would switch convs to NHWC)."""
    unsafe = onednn_unsafe_convs(model) if device.type == "cpu" else []
    if not unsafe:
        return
    if cfg["channels_last"]:
        raise ValueError(f"--channels-last on CPU: {len(unsafe)} strided 1x1 convolution(s) with fewer than 16 input "
                         f"channels ({', '.join(unsafe[:3])}{', ...' if len(unsafe) > 3 else ''}) hit a oneDNN bug "
                         "in channels_last backward (uxlfoundation/oneDNN#6035); train without --channels-last")
    if cfg["compile"]:
        import torch._inductor.config as inductor_config

        inductor_config.layout_optimization = False


def wrap(model: nn.Module, cfg: dict, world: int, device: torch.device) -> nn.Module:
    """DDP (when distributed) and torch.compile around the model; the bare model stays the one saved."""
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(net) if cfg["compile"] else net


def lr_factor(schedule: str, step: int, total: int, milestones: list[int], gamma: float, warmup: int | None) -> float:
    """Learning-rate multiplier at ``step`` (a pure function of the step, so resuming needs no scheduler state)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        return gamma ** sum(step >= m for m in milestones)
    if schedule == "linear":
        return 1.0 - step / total
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total))
    return 1.0


def running_stats(running: Tensor, model: nn.Module) -> dict:
    loss, correct, count = running.tolist()
    return dict(loss=loss / max(count, 1), acc=correct / max(count, 1), sparsity=model_sparsity(model))


def model_sparsity(model: nn.Module) -> float | None:
    """Fraction of shift channels at (0, 0); None (JSON null, shown as n/a) for a model without shift layers."""
    sparsity = shift_sparsity(model)
    return None if math.isnan(sparsity) else sparsity


def all_reduce(t: Tensor, world: int) -> Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


def sync_buffers(model: nn.Module, world: int) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank, so all ranks hold the saved model."""
    if world > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


@torch.no_grad()
def evaluate(model: nn.Module, loader, world: int = 1, autocast=None) -> tuple[float, float]:
    """(mean loss, accuracy) over the loader's examples (summed over ranks under DDP)."""
    sync_buffers(model, world)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with autocast or contextlib.nullcontext():
        for x, y in loader.batches():
            logits = model(x).float()
            sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                 (logits.argmax(1) == y).sum().double(),
                                 torch.tensor(len(y), dtype=torch.float64, device=device)])
    model.train(was_training)
    sums = all_reduce(sums, world)
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def check_ranks_identical(model: nn.Module, world: int) -> bool | None:
    """Under DDP: do all ranks hold bit-identical parameters and buffers? (None when not distributed.)"""
    if world == 1:
        return None
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest = torch.tensor([int.from_bytes(h.digest()[:7], "big")], dtype=torch.int64)
    device = next(model.parameters()).device
    digests = [torch.zeros_like(digest, device=device) for _ in range(world)]
    dist.all_gather(digests, digest.to(device))
    if any(int(d) != int(digests[0]) for d in digests):
        raise RuntimeError("DDP ranks ended with different weights")
    return True


def get_rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def install_signal_handlers(caught: list[int]) -> dict:
    """SIGINT/SIGTERM only set a flag; the loop checkpoints after the current step. A second one aborts."""
    def handler(signum, frame):
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)

    old = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, handler)
    return old


def restore_signal_handlers(old: dict) -> None:
    for s, h in old.items():
        signal.signal(s, h)
