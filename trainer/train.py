"""LoRA / QLoRA supervised fine-tuning: a training loop you can read top to bottom.

    settings → tokenizer + samples (owner-only targets) → base model + LoRA
             → for each step: micro-batches → masked loss → backward → clip → AdamW → cosine LR
             → checkpoints/step-N/ (resumable) → adapter/ + metrics.json (the run is complete)

The loss is a token mean over assistant tokens only. Logits are computed only where a
target exists, which saves most of the lm_head work on chat data (prompts are long,
replies short). Runs under `accelerate launch` too (DDP, FSDP, DeepSpeed configs in
`deploy/accelerate/`): each process takes every world-size-th micro-batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import InputError
from pipeline.files import atomic_dir, private_dir, write_text_atomic
from trainer.config import ADAPTER_DIR, METRICS_FILE, SETTINGS_FILE, TrainSettings
from trainer.data import IGNORE, Batch, dataset_hash, encode_all, iter_micro_batches, load_split
from trainer.models import BaseModelRef, LoraTargets

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"


@dataclass(slots=True)
class TrainResult:
    """What a finished run produced and how fast it went."""

    run_dir: Path
    adapter_dir: Path
    steps: int
    train_tokens: int
    label_tokens: int
    train_runtime_s: float
    tokens_per_s: float
    final_loss: float
    peak_rss_mb: float
    resumed_from_step: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["run_dir"], data["adapter_dir"] = str(self.run_dir), str(self.adapter_dir)
        return data


@dataclass(slots=True)
class TrainState:
    """Counters carried across a resume."""

    step: int = 0
    tokens: int = 0
    label_tokens: int = 0
    elapsed_s: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)

    def advance(self, *, tokens: int, label_tokens: int, loss: float, lr: float, elapsed_s: float) -> None:
        """Count one optimizer step and add it to the loss curve."""
        self.step += 1
        self.tokens += tokens
        self.label_tokens += label_tokens
        self.elapsed_s = elapsed_s
        self.curve.append(
            {
                "step": self.step,
                "loss": round(loss, 5),
                "lr": lr,
                "tokens": self.tokens,
                "elapsed_s": round(self.elapsed_s, 3),
            }
        )


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AMX or AVX512-BF16), where autocast is ~2× faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# ---------------------------------------------------------------- the loss


def owner_loss(model: Any, batch: Batch) -> tuple[Any, int]:
    """Summed cross-entropy over target tokens only, and how many there were.

    The decoder runs on every token; the vocabulary projection runs only where a
    target exists. Packed rows pass no attention mask: restarting position ids make
    transformers build a block-diagonal causal mask, so samples never see each other.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(lm, lm.base_model_prefix)
    hidden = decoder(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
        use_cache=False,
    ).last_hidden_state
    selected = batch.targets != IGNORE
    logits = lm.get_output_embeddings()(hidden[selected]).float()
    count = int(selected.sum())
    return torch.nn.functional.cross_entropy(logits, batch.targets[selected], reduction="sum"), count


# ---------------------------------------------------------------- the run


StepCallback = Callable[[int, int, float], None]


@dataclass(slots=True)
class _Run:
    """What `_prepare` hands `_fit` and `_save`: a model, its data and its optimizer, ready to step."""

    settings: TrainSettings
    run_dir: Path
    base: BaseModelRef
    accelerator: Any
    use_bf16: bool
    tokenizer: Any
    model: Any  # the LoRA model, as `save_pretrained` wants it
    wrapped: Any  # the same, as accelerate prepared it for this backend
    trainable: list[Any]
    optimizer: Any
    scheduler: Any
    checkpointer: _Checkpointer
    batches: Iterator[Batch]
    micro_per_step: int  # across all processes
    total_steps: int
    state: TrainState
    resumed_from: int


def train(
    settings: TrainSettings, *, progress: bool = True, on_step: StepCallback | None = None
) -> TrainResult:
    """Fine-tune `settings.base_model` on `settings.data`; resumes a killed run in the same directory.

    `on_step(step, total_steps, loss)` is called after every optimizer step (for status files).
    """
    run_dir = Path(settings.output_dir)
    if (run_dir / METRICS_FILE).is_file() and (run_dir / ADAPTER_DIR).is_dir():
        log.info("%s is a finished run; nothing to do", run_dir)
        return _result_from_metrics(run_dir)
    run = _prepare(settings, run_dir)
    runtime = _fit(run, progress=progress, on_step=on_step)
    _save(run, runtime)
    return _result_from_metrics(run_dir)


def _prepare(settings: TrainSettings, run_dir: Path) -> _Run:
    """Samples, the base model with LoRA, AdamW and its schedule, wrapped for this backend and
    restored from the run's latest checkpoint if it has one."""
    from trainer.models import check_qlora, load_tokenizer, resolve_base

    conversations = load_split(settings.data)
    base = resolve_base(settings.base_model, settings.gguf_file)
    accelerator = _accelerator()
    device = accelerator.device
    on_cuda = device.type == "cuda"
    use_bf16 = settings.bf16 if settings.bf16 is not None else (on_cuda or cpu_has_native_bf16())
    if settings.qlora:
        check_qlora(device.type)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    _seed_everything(settings.seed)

    tokenizer = load_tokenizer(base)
    samples = _encode(settings, tokenizer, conversations)
    # CUDA keeps bf16 weights; on CPU weights stay fp32 and bf16 is autocast only (AMX/AVX512-BF16).
    model = _lora_model(settings, base, torch.bfloat16 if use_bf16 and on_cuda else torch.float32, device)

    micro_per_step = settings.grad_accum * accelerator.num_processes
    steps_per_epoch = max(1, _micro_batches_per_epoch(samples, settings) // micro_per_step)
    total_steps = settings.max_steps or max(1, math.ceil(steps_per_epoch * settings.epochs))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = _cosine_with_warmup(optimizer, round(total_steps * settings.warmup_ratio), total_steps)
    checkpoint = _open_run_dir(run_dir, settings, base, accelerator)

    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None:
        # accelerate sizes DeepSpeed's batch from a dataloader; this loop collates its own micro-batches.
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = settings.batch_size
    wrapped, optimizer = accelerator.prepare(OwnerLossModel(model), optimizer)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP2 swapped in sharded ones
    checkpointer = _checkpointer(accelerator, wrapped, model, optimizer)
    # Resume after `prepare`: a sharded model's weights and optimizer state can only be set once wrapped.
    state = TrainState()
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, checkpointer, scheduler)
        log.info("resuming %s from step %d", run_dir, state.step)

    return _Run(
        settings=settings,
        run_dir=run_dir,
        base=base,
        accelerator=accelerator,
        use_bf16=use_bf16,
        tokenizer=tokenizer,
        model=model,
        wrapped=wrapped,
        trainable=trainable,
        optimizer=optimizer,
        scheduler=scheduler,
        checkpointer=checkpointer,
        # Replay the data order up to where the checkpoint stopped (collation only, no compute).
        batches=_micro_batches(samples, tokenizer, settings, skip=state.step * micro_per_step),
        micro_per_step=micro_per_step,
        total_steps=total_steps,
        state=state,
        resumed_from=state.step,
    )


def _encode(settings: TrainSettings, tokenizer: Any, conversations: list) -> list:
    """Every conversation as token ids with owner-only targets; a clear error when none fits."""
    samples = encode_all(tokenizer, conversations, settings.max_seq_len, loss_on=settings.loss_on)
    if not samples:
        raise InputError(
            Path(settings.data) / "train.jsonl",
            f"no sample keeps an assistant reply within max_seq_len={settings.max_seq_len} tokens",
        )
    return samples


def _lora_model(settings: TrainSettings, base: BaseModelRef, dtype: torch.dtype, device: Any) -> Any:
    """The base model on `device` with LoRA (new, or continuing `init_adapter`) ready to train."""
    from trainer.models import load_model, lora_targets

    model = load_model(base, dtype=dtype, qlora=settings.qlora, device=str(device))
    model = _add_lora(model, settings, lora_targets(model, settings))
    model.config.use_cache = False
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def _open_run_dir(
    run_dir: Path, settings: TrainSettings, base: BaseModelRef, accelerator: Any
) -> Path | None:
    """The run's latest checkpoint when it resumes (with the same settings); else its settings written."""
    private_dir(run_dir)
    checkpoint = _latest_checkpoint(run_dir)
    if checkpoint is not None:
        _check_same_run(run_dir, settings)
    elif accelerator.is_main_process:
        stored = {"settings": settings.model_dump(mode="json"), "base": base.to_dict()}
        stored["dataset_hash"] = dataset_hash(settings.data)
        write_text_atomic(run_dir / SETTINGS_FILE, json.dumps(stored, ensure_ascii=False, indent=2))
    return checkpoint


def _micro_batches(samples: list, tokenizer: Any, settings: TrainSettings, *, skip: int) -> Iterator[Batch]:
    """The endless micro-batch stream, past the first `skip` micro-batches."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = iter_micro_batches(
        samples,
        batch_size=settings.batch_size,
        row_len=settings.max_seq_len,
        pack=settings.pack,
        pad_id=pad_id,
        seed=settings.seed,
    )
    for _ in range(skip):
        next(batches)
    return batches


def _fit(run: _Run, *, progress: bool, on_step: StepCallback | None) -> float:
    """Optimizer steps up to `total_steps`, checkpointing as it goes; returns the seconds spent."""
    settings, accelerator, state = run.settings, run.accelerator, run.state
    run.wrapped.train()
    bar = _ProgressBar(run.total_steps, enabled=progress and accelerator.is_main_process)
    bar.advance_to(state.step)
    started = time.perf_counter() - state.elapsed_s
    try:
        while state.step < run.total_steps:
            micro = [next(run.batches) for _ in range(run.micro_per_step)]
            step_targets = sum(int((b.targets != IGNORE).sum()) for b in micro)
            loss_sum = _backward(run, micro, step_targets)
            accelerator.clip_grad_norm_(run.trainable, settings.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)

            step_loss = loss_sum / max(step_targets, 1)
            state.advance(
                tokens=sum(b.tokens for b in micro),
                label_tokens=step_targets,
                loss=step_loss,
                lr=run.scheduler.get_last_lr()[0],
                elapsed_s=time.perf_counter() - started,
            )
            bar.update(state.step, step_loss, state.tokens / max(state.elapsed_s, 1e-9))
            if on_step is not None and accelerator.is_main_process:
                on_step(state.step, run.total_steps, step_loss)
            if state.step % settings.save_every == 0 and state.step < run.total_steps:
                _save_checkpoint(run.run_dir, accelerator, run.checkpointer, run.scheduler, state, settings)
            accelerator.wait_for_everyone()
    finally:
        bar.close()
    return time.perf_counter() - started


def _backward(run: _Run, micro: list[Batch], step_targets: int) -> float:
    """Forward and backward over this process's share of one step's micro-batches; the summed
    loss of the whole step, across processes."""
    accelerator, device = run.accelerator, run.accelerator.device
    mine = micro[accelerator.process_index :: accelerator.num_processes]
    loss_total = 0.0
    for index, batch in enumerate(mine):
        batch = batch.to(device)
        sync = accelerator.no_sync(run.wrapped) if index < len(mine) - 1 else contextlib.nullcontext()
        with sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
            loss_sum, _ = run.wrapped(batch)
        # A token mean over the whole step, across micro-batches and processes.
        loss = loss_sum * accelerator.num_processes / max(step_targets, 1)
        accelerator.backward(loss)
        loss_total += float(loss_sum.detach())
    return _all_reduce_sum(accelerator, loss_total)


def _save(run: _Run, runtime: float) -> None:
    """`adapter/` and `metrics.json`, which together mark the run finished; checkpoints go."""
    accelerator, run_dir = run.accelerator, run.run_dir
    weights = run.checkpointer.adapter_weights()  # every process takes part; complete on the main one
    if accelerator.is_main_process:
        with atomic_dir(run_dir / ADAPTER_DIR) as tmp:
            run.model.save_pretrained(tmp, state_dict=weights)
            run.tokenizer.save_pretrained(tmp)
        metrics = _metrics(
            run.state, runtime, run.total_steps, run.resumed_from, run.settings, run.base.to_dict()
        )
        metrics["processes"] = accelerator.num_processes
        on_cuda = accelerator.device.type == "cuda"
        metrics["precision"] = ("bf16" if on_cuda else "fp32 + bf16 autocast") if run.use_bf16 else "fp32"
        write_text_atomic(run_dir / METRICS_FILE, json.dumps(metrics, ensure_ascii=False, indent=2))
        shutil.rmtree(run_dir / CHECKPOINTS_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()


class OwnerLossModel(torch.nn.Module):
    """The LoRA model with `owner_loss` as its forward, so DDP/FSDP wrappers run their hooks."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[Any, int]:
        return owner_loss(self.model, batch)


# ---------------------------------------------------------------- pieces of the run


def _accelerator() -> Any:
    from accelerate import Accelerator

    return Accelerator(cpu=not _cuda_available())


def _cuda_available() -> bool:

    return torch.cuda.is_available()


def _all_reduce_sum(accelerator: Any, value: float) -> float:
    if accelerator.num_processes == 1:
        return value

    tensor = torch.tensor([value], device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="sum")[0])


def _seed_everything(seed: int) -> None:

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def _add_lora(model: Any, settings: TrainSettings, targets: LoraTargets) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    from trainer.models import cap_fused_experts

    if settings.qlora:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing
        )
    if settings.init_adapter is not None:
        adapter = Path(settings.init_adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise InputError(adapter, "not a LoRA adapter directory (no adapter_config.json)")
        log.info("continuing adapter %s", adapter)
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    else:
        config = LoraConfig(
            r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=targets.modules,
            target_parameters=targets.parameters or None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    if capped := cap_fused_experts(model, settings.max_experts):
        log.info("LoRA on %d fused expert tensors limited to experts < %d", capped, settings.max_experts)
    return model


def _micro_batches_per_epoch(samples: list, settings: TrainSettings) -> int:
    from trainer.data import pack_rows

    if settings.pack:
        rows = len(pack_rows(samples, settings.max_seq_len))
        return math.ceil(rows / settings.batch_size)
    return math.ceil(len(samples) / settings.batch_size)


def _cosine_with_warmup(optimizer: Any, warmup: int, total: int) -> Any:
    """Linear warm-up to the peak LR, then a cosine decay to zero at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- checkpoints


# Settings a checkpoint depends on: changing one makes "resume" silently train something else.
RESUME_KEYS = ("base_model", "gguf_file", "data", "max_seq_len", "pack", "batch_size", "grad_accum", "seed")
RESUME_KEYS += ("lora_r", "lora_alpha", "target_modules", "moe_lora_scope", "max_experts", "qlora", "loss_on")


def _check_same_run(run_dir: Path, settings: TrainSettings) -> None:
    try:
        stored = json.loads((run_dir / SETTINGS_FILE).read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError):
        return
    current = settings.model_dump(mode="json")
    changed = [k for k in RESUME_KEYS if stored.get(k) != current.get(k)]
    if changed:
        raise InputError(
            run_dir,
            f"has a checkpoint made with different {', '.join(changed)}; "
            "re-run with the same settings to resume, or use a new run directory",
        )


def _latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINTS_DIR).glob("step-*"))
    complete = [p for p in found if (p / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def _save_checkpoint(
    run_dir: Path,
    accelerator: Any,
    checkpointer: _Checkpointer,
    scheduler: Any,
    state: TrainState,
    settings: TrainSettings,
) -> None:
    """`checkpoints/step-N/`: adapter weights, optimizer, scheduler, RNG and counters, all or nothing.

    Every process calls this: under FSDP and ZeRO-3 each one holds a shard of what is saved.
    """
    checkpoints = run_dir / CHECKPOINTS_DIR
    if accelerator.is_main_process:
        private_dir(checkpoints)
    weights = checkpointer.adapter_weights()
    with _atomic_dir_for_every_process(accelerator, checkpoints / f"step-{state.step:07d}") as tmp:
        saved = checkpointer.save(tmp, weights)
        if accelerator.is_main_process:
            checkpointer.model.save_pretrained(tmp, state_dict=weights)
            saved |= {
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "state": asdict(state),
            }
            torch.save(saved, tmp / STATE_FILE)
    if accelerator.is_main_process:
        for old in sorted(checkpoints.glob("step-*"))[: -settings.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, checkpointer: _Checkpointer, scheduler: Any) -> TrainState:
    """Restore a checkpoint into the prepared (wrapped) model and optimizer, on every process."""
    saved = torch.load(path / STATE_FILE, weights_only=False)
    checkpointer.load(path, saved)
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["python_rng"])
    return TrainState(**saved["state"])


@contextlib.contextmanager
def _atomic_dir_for_every_process(accelerator: Any, final: Path) -> Iterator[Path]:
    """`atomic_dir` owned by the main process, its temporary path shared so that every process can
    write its shard; `final` appears only after all of them have finished."""
    main = accelerator.is_main_process
    with atomic_dir(final) if main else contextlib.nullcontext() as tmp:
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            tmp = broadcast_object_list([tmp if main else None])[0]
        yield Path(tmp)
        accelerator.wait_for_everyone()


# What a checkpoint holds and how it is gathered differs by backend; these two classes are the only
# place that knows. Both keep just the trainable (LoRA) tensors, never the frozen base.

# OwnerLossModel keeps the LoRA model under `.model`; peft names adapter tensors from below it.
_INNER = "model."


class _StateDictCheckpointer:
    """One process, DDP, FSDP1 and FSDP2: torch's distributed state-dict API.

    It gathers the LoRA tensors and their optimizer state, keyed by parameter name, onto the main
    process (without sharding this is a plain copy). On resume every process reads the same small
    file and keeps its own shard of it.
    """

    def __init__(self, wrapped: Any, model: Any, optimizer: Any) -> None:
        self.wrapped, self.model = wrapped, model
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer under accelerate's

    def adapter_weights(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        weights = get_model_state_dict(self.wrapped, options=options)
        return {name.removeprefix(_INNER): tensor for name, tensor in weights.items()}

    def save(self, tmp: Path, weights: dict[str, Any]) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer = get_optimizer_state_dict(self.wrapped, self.optimizer, options=options)
        return {"weights": weights, "optimizer": optimizer}

    def load(self, path: Path, saved: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        weights = {_INNER + name: tensor for name, tensor in saved["weights"].items()}
        options = StateDictOptions(full_state_dict=True, strict=False)  # the frozen base is not in it
        set_model_state_dict(self.wrapped, weights, options=options)
        set_optimizer_state_dict(self.wrapped, self.optimizer, saved["optimizer"], options=options)


class _DeepSpeedCheckpointer:
    """DeepSpeed ZeRO-3: parameters and optimizer state are partitioned across processes.

    The engine's own checkpoint (every process writes its partition) holds the optimizer and the
    fp32 LoRA weights; the adapter files are gathered from the trainable parameters alone.
    """

    DIR, TAG = "deepspeed", "state"

    def __init__(self, engine: Any, model: Any) -> None:
        self.engine, self.model = engine, model

    def adapter_weights(self) -> dict[str, Any]:
        import deepspeed

        trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        with deepspeed.zero.GatheredParameters(list(trainable.values())):
            return {name: p.detach().cpu().clone() for name, p in trainable.items()}

    def save(self, tmp: Path, weights: dict[str, Any]) -> dict[str, Any]:
        self.engine.save_checkpoint(str(tmp / self.DIR), tag=self.TAG, exclude_frozen_parameters=True)
        return {}

    def load(self, path: Path, saved: dict[str, Any]) -> None:
        self.engine.load_checkpoint(
            str(path / self.DIR), tag=self.TAG, load_module_strict=False, load_lr_scheduler_states=False
        )


_Checkpointer = _StateDictCheckpointer | _DeepSpeedCheckpointer


def _checkpointer(accelerator: Any, wrapped: Any, model: Any, optimizer: Any) -> _Checkpointer:
    """How this run's backend saves and restores the LoRA weights and optimizer state."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _DeepSpeedCheckpointer(wrapped, model)
    return _StateDictCheckpointer(wrapped, model, optimizer)


# ---------------------------------------------------------------- metrics


def _metrics(
    state: TrainState,
    runtime: float,
    total_steps: int,
    resumed_from: int,
    settings: TrainSettings,
    base: dict[str, Any],
) -> dict[str, Any]:

    metrics: dict[str, Any] = {
        "steps": state.step,
        "total_steps": total_steps,
        "train_tokens": state.tokens,
        "label_tokens": state.label_tokens,
        "train_runtime_s": round(runtime, 3),
        "tokens_per_s": round(state.tokens / runtime, 2) if runtime > 0 else 0.0,
        "final_loss": state.curve[-1]["loss"] if state.curve else float("nan"),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "resumed_from_step": resumed_from,
        "base": base,
        "pack": settings.pack,
        "loss_curve": state.curve,
    }
    if torch.cuda.is_available():
        metrics["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return metrics


def _result_from_metrics(run_dir: Path) -> TrainResult:
    metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    return TrainResult(
        run_dir=run_dir,
        adapter_dir=run_dir / ADAPTER_DIR,
        steps=metrics["steps"],
        train_tokens=metrics["train_tokens"],
        label_tokens=metrics["label_tokens"],
        train_runtime_s=metrics["train_runtime_s"],
        tokens_per_s=metrics["tokens_per_s"],
        final_loss=metrics["final_loss"],
        peak_rss_mb=metrics["peak_rss_mb"],
        resumed_from_step=metrics.get("resumed_from_step", 0),
    )


class _ProgressBar:
    """A rich progress bar showing loss, tokens/s and ETA (quiet when disabled)."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} tok/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task("train", total=total, loss="-", rate="-")
        self.progress.start()

    def advance_to(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def update(self, step: int, loss: float, rate: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.3f}", rate=f"{rate:,.0f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
