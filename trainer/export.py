"""A finished run → a model directory the bot serves: merged, converted, quantised, verified.

    run/adapter + base ──merge──► HF safetensors + tokenizer (chat template)
        ──llama.cpp's convert_hf_to_gguf.py──► F16 GGUF ──llama_model_quantize──► model-<QUANT>.gguf
        ──load in llama.cpp, generate from a chat prompt──► manifest.json, Modelfile, adapter/

The converter is llama.cpp's own, taken from the llama-cpp-python sdist of exactly the
installed version (so the GGUF matches the runtime that loads it) and cached.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import registry
from pipeline.chatformat import DEFAULT_PERSONA, clean_model_output, system_prompt
from pipeline.errors import InputError, TwinError
from pipeline.files import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, atomic_dir, disk_full_is_input_error
from pipeline.llama_prompt import prompt_token_ids
from trainer.config import ADAPTER_DIR, METRICS_FILE, SETTINGS_FILE
from trainer.data import TRAIN_FILE
from trainer.models import BaseModelRef, cache_root, hf_copy

log = logging.getLogger(__name__)

CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
CONVERTER_DIRS = ("conversion", "gguf-py")
LORA_GGUF = "adapter.gguf"
MODELFILE = "Modelfile"
VERIFY_PROMPT = "在吗？今天晚上一起去吃火锅吧"
# What `save_pretrained` of a tokenizer writes (the adapter directory holds them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_FILES += ("chat_template.jinja",)
# Unquantised outputs the converter writes directly.
CONVERTER_OUTTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


@dataclass(slots=True)
class ExportResult:
    """What `export` wrote: the model directory, its GGUFs and how long it took."""

    model_dir: Path
    gguf: dict[str, Path]
    lora_gguf: Path | None
    sizes: dict[str, int]
    seconds: float
    samples: dict[str, str] = field(default_factory=dict)  # quant → the verification reply

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model_dir"] = str(self.model_dir)
        data["gguf"] = {q: str(p) for q, p in self.gguf.items()}
        data["lora_gguf"] = str(self.lora_gguf) if self.lora_gguf else None
        return data


# ---------------------------------------------------------------- quantisation types


def quant_types() -> dict[str, int]:
    """llama.cpp's file types by name (Q8_0, Q4_K_M, F16, …), as the installed version knows them."""
    import llama_cpp

    types = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32}
    prefix = "LLAMA_FTYPE_MOSTLY_"
    for name in dir(llama_cpp):
        # IQ types need an importance matrix, which a chat-style fine-tune does not ship.
        if name.startswith(prefix) and not name[len(prefix) :].startswith("IQ"):
            types[name[len(prefix) :]] = getattr(llama_cpp, name)
    return types


def parse_quants(quants: Sequence[str]) -> list[str]:
    """Normalise and check requested types; an unknown one is a one-line error."""
    known = quant_types()
    out: list[str] = []
    for quant in quants:
        name = quant.strip().upper()
        if not name:
            continue
        if name not in known:
            raise TwinError(
                f"unknown quantisation type {quant!r}; llama.cpp knows: {', '.join(sorted(known))}"
            )
        if name not in out:
            out.append(name)
    return out


# ---------------------------------------------------------------- llama.cpp's converter


def converter_cache_dir() -> Path:
    """`$QQ_TWIN_CACHE/llama.cpp-<ver>` (default `~/.cache/qq-twin/…`) for the installed version."""
    import llama_cpp

    return cache_root() / f"llama.cpp-{llama_cpp.__version__}"


def ensure_converter() -> Path:
    """Path of llama.cpp's `convert_hf_to_gguf.py` matching the installed llama-cpp-python.

    First use fetches that version's sdist with pip (its cache makes this offline-safe once
    the package was built here) and keeps only the converter scripts and `gguf-py`.
    """
    import llama_cpp

    target = converter_cache_dir()
    script = target / CONVERTER_FILES[0]
    if script.is_file():
        return script
    version = llama_cpp.__version__
    with tempfile.TemporaryDirectory(prefix="qq-twin-sdist-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += ["--quiet", "--dest", tmp, f"llama-cpp-python=={version}"]
        done = subprocess.run(command, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr.strip().splitlines() or ["pip download failed"])[-1]
            raise TwinError(f"cannot fetch llama.cpp's converter (llama-cpp-python=={version} sdist): {last}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(target) as staging:
            _extract_converter(archives[0], staging)
    return script


def _extract_converter(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/")
            # <sdist>/vendor/llama.cpp/<what we keep>
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                continue
            rest = parts[3:]
            if (len(rest) == 1 and rest[0] in CONVERTER_FILES) or rest[0] in CONVERTER_DIRS:
                member.name = "/".join(rest)
                members.append(member)
        if not any(m.name == CONVERTER_FILES[0] for m in members):
            raise TwinError(f"{archive.name}: no vendor/llama.cpp/{CONVERTER_FILES[0]} inside")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.10.12
            tar.extractall(dest, members=members)


def _run_converter(script: str, args: list[str]) -> None:
    converter = ensure_converter().parent
    env = dict(os.environ)
    # The vendored gguf-py must win over any installed `gguf` of another version.
    env["PYTHONPATH"] = os.pathsep.join([str(converter / "gguf-py"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    env.setdefault("NO_LOCAL_GGUF", "")
    done = subprocess.run(
        [sys.executable, str(converter / script), *args], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["failed"]
        if any("No space left" in line for line in lines):
            raise OSError(errno.ENOSPC, "No space left on device")
        raise TwinError(f"llama.cpp {script} failed: {lines[-1]}")


# ---------------------------------------------------------------- export


def export(
    run_dir: Path,
    out_dir: Path,
    *,
    quants: Sequence[str] = ("Q8_0",),
    lora_gguf: bool = False,
    progress: bool = True,
    persona: str | None = None,
    n_threads: int = 2,
    keep_merged: bool = False,
) -> ExportResult:
    """Merge the run's adapter, convert, quantise and verify; `out_dir` appears only when complete."""
    started = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = _read_run(run_dir)
    wanted = parse_quants(quants)
    if not wanted and not lora_gguf:
        raise TwinError("nothing to export: give at least one --quant or --lora-gguf")
    ensure_converter()
    base = BaseModelRef(**run["base"])
    system = _training_system_prompt(run, persona)

    gguf: dict[str, Path] = {}
    replies: dict[str, str] = {}
    lora_path: Path | None = None
    full_disk = disk_full_is_input_error(out_dir, "nothing was written")
    with _steps(progress) as step, full_disk, atomic_dir(out_dir) as tmp:
        work = Path(tempfile.mkdtemp(prefix=".export-", dir=tmp))
        hf_dir = work / "merged"
        if wanted:
            intermediate = next((q for q in wanted if q in CONVERTER_OUTTYPES), "F16")
            with step("merge the LoRA adapter into the base"):
                merge_adapter(base, run_dir / ADAPTER_DIR, hf_dir, dtype=intermediate)
            converted = work / registry.gguf_name(intermediate)
            with step(f"convert to GGUF ({intermediate}) with llama.cpp's converter"):
                _run_converter(
                    CONVERTER_FILES[0],
                    [str(hf_dir), "--outfile", str(converted), "--outtype", CONVERTER_OUTTYPES[intermediate]],
                )
            for quant in wanted:
                final = tmp / registry.gguf_name(quant)
                with step(f"quantise {quant}"):
                    if quant == intermediate:
                        shutil.copyfile(converted, final)
                    else:
                        quantize(converted, final, quant, n_threads=n_threads)
                with step(f"verify {quant}: load in llama.cpp and generate"):
                    replies[quant] = verify_gguf(final, system)
                gguf[quant] = out_dir / final.name
        if lora_gguf:
            with step("write the adapter alone as GGUF (convert_lora_to_gguf.py)"):
                if not hf_dir.is_dir():
                    _write_base_config(base, run_dir / ADAPTER_DIR, hf_dir)
                _run_converter(
                    CONVERTER_FILES[1],
                    [str(run_dir / ADAPTER_DIR), "--base", str(hf_dir), "--outfile", str(tmp / LORA_GGUF)],
                )
            if base.gguf_file:
                with step("verify the LoRA GGUF over its base GGUF"):
                    base_gguf = Path(base.source) / base.gguf_file
                    replies["lora"] = verify_gguf(base_gguf, system, lora=tmp / LORA_GGUF)
            lora_path = out_dir / LORA_GGUF
        with step("write manifest.json, Modelfile and adapter/"):
            if keep_merged and hf_dir.is_dir():
                shutil.move(str(hf_dir), tmp / "merged")
            shutil.rmtree(work)
            shutil.copytree(run_dir / ADAPTER_DIR, tmp / registry.ADAPTER_DIR)
            sizes = {p.name: p.stat().st_size for p in sorted(tmp.glob("*.gguf"))}
            manifest = _manifest(out_dir, run, base, wanted, system, persona, sizes, lora_gguf)
            (tmp / registry.MANIFEST_FILE).write_text(
                json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8"
            )
            if wanted:
                (tmp / MODELFILE).write_text(
                    ollama_modelfile(registry.gguf_name(wanted[0]), _gguf_template(tmp, wanted[0]), system),
                    encoding="utf-8",
                )
            _make_private(tmp)
    return ExportResult(
        model_dir=out_dir,
        gguf=gguf,
        lora_gguf=lora_path,
        sizes=sizes,
        seconds=round(time.perf_counter() - started, 2),
        samples=replies,
    )


def _read_run(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / METRICS_FILE).is_file() or not (run_dir / ADAPTER_DIR).is_dir():
        raise InputError(
            run_dir, "not a finished training run (no adapter/ and metrics.json); run `twin train`"
        )
    try:
        run = json.loads((run_dir / SETTINGS_FILE).read_text(encoding="utf-8"))
        run["metrics"] = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(run_dir, f"unreadable run files ({exc})") from None
    return run


def _training_system_prompt(run: dict[str, Any], persona: str | None) -> str:
    """The system prompt the twin was trained with (first training sample), else the persona's."""
    if persona:
        return system_prompt(persona)
    data = Path(run["settings"]["data"]) / TRAIN_FILE
    if data.is_file():
        with data.open(encoding="utf-8") as handle:
            first = handle.readline()
        for message in json.loads(first).get("messages", []) if first.strip() else []:
            if message.get("role") == "system":
                return str(message["content"])
    return system_prompt(DEFAULT_PERSONA)


def merge_adapter(base: BaseModelRef, adapter_dir: Path, out_dir: Path, *, dtype: str = "F16") -> None:
    """Base (its cached HF copy when a GGUF) + LoRA → one HF safetensors model with the tokenizer.

    The merge is computed in the base's precision and saved in `dtype`, the GGUF type the
    converter writes next: rounding once here is what the converter would do, at half the bytes.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_copy(base).source, dtype="auto")
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    model.to(torch_dtype).save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(out_dir)


def _write_base_config(base: BaseModelRef, adapter_dir: Path, out_dir: Path) -> None:
    """The base's config.json and the tokenizer files, no weights: all `convert_lora_to_gguf.py` reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(hf_copy(base).source) / "config.json", out_dir / "config.json")
    for name in TOKENIZER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copyfile(adapter_dir / name, out_dir / name)


def quantize(source: Path, dest: Path, quant: str, *, n_threads: int = 2) -> None:
    """llama.cpp's own quantiser, in-process."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_types()[quant]
    params.nthread = n_threads
    with native_output_captured() as log_file:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), params)
    if status != 0 or not dest.is_file():
        last = (log_file.read_text(errors="replace").strip().splitlines() or [""])[-1]
        raise TwinError(f"llama.cpp could not quantise {source.name} to {quant}: {last or status}")


@contextmanager
def native_output_captured() -> Iterator[Path]:
    """Send what C code prints on fds 1/2 (llama.cpp's per-tensor log) to a temp file."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.NamedTemporaryFile(prefix="qq-twin-llama-", suffix=".log") as log_file:
        saved = os.dup(1), os.dup(2)
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            yield Path(log_file.name)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def verify_gguf(path: Path, system: str, *, lora: Path | None = None, n_threads: int = 1) -> str:
    """Load a GGUF in llama.cpp and greedily answer a chat prompt; it must produce tokens.

    One thread by default: a 16-token check gains nothing from more, and two llama.cpp threads
    on two busy cores can stall for seconds.
    """
    from llama_cpp import Llama

    kwargs: dict[str, Any] = {"lora_path": str(lora)} if lora else {}
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=n_threads, verbose=False, seed=0, **kwargs)
    try:
        template = llm.metadata.get("tokenizer.chat_template", "")
        if not template:
            raise TwinError(f"{path.name}: the GGUF carries no tokenizer.chat_template")
        bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "ignore")
        eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "ignore")
        messages = [{"role": "system", "content": system}, {"role": "user", "content": VERIFY_PROMPT}]
        tokens = prompt_token_ids(llm, template, messages, bos=bos, eos=eos)
        out = llm.create_completion(tokens, max_tokens=16, temperature=0.0, stop=[eos] if eos else None)
        produced = int(out["usage"]["completion_tokens"])
        if produced < 1:
            raise TwinError(f"{path.name}: llama.cpp loaded the model but it generated nothing")
        return clean_model_output(out["choices"][0]["text"])
    finally:
        llm.close()


def _make_private(root: Path) -> None:
    for path in root.rglob("*"):
        os.chmod(path, PRIVATE_DIR_MODE if path.is_dir() else PRIVATE_FILE_MODE)


def _gguf_template(model_dir: Path, quant: str) -> str:
    """The chat template stored in a GGUF (llama.cpp reads only the vocabulary and metadata)."""
    from llama_cpp import Llama

    with native_output_captured():
        llm = Llama(model_path=str(model_dir / registry.gguf_name(quant)), vocab_only=True, verbose=False)
    try:
        return str(llm.metadata.get("tokenizer.chat_template", ""))
    finally:
        llm.close()


def _manifest(
    out_dir: Path,
    run: dict[str, Any],
    base: BaseModelRef,
    quants: list[str],
    system: str,
    persona: str | None,
    sizes: dict[str, int],
    lora_gguf: bool,
) -> dict[str, Any]:
    metrics = {k: v for k, v in run["metrics"].items() if k != "loss_curve"}
    eval_path = Path(run["settings"]["output_dir"]) / "eval.json"
    return {
        "version": out_dir.name,
        "base": base.name or base.source,
        "base_source": base.to_dict(),
        "dataset": run["settings"]["data"],
        "dataset_hash": run.get("dataset_hash", ""),
        "run_dir": run["settings"]["output_dir"],
        "metrics": metrics,
        "eval": json.loads(eval_path.read_text(encoding="utf-8")) if eval_path.is_file() else None,
        "quantisations": quants,
        "gguf": {q: registry.gguf_name(q) for q in quants},
        "default_quant": quants[0] if quants else None,
        "lora_gguf": LORA_GGUF if lora_gguf else None,
        "adapter": registry.ADAPTER_DIR,
        "system_prompt": system,
        "persona": persona,
        "sizes": sizes,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- Ollama


def ollama_modelfile(gguf_file: str, jinja_template: str, system: str) -> str:
    """An Ollama Modelfile: the GGUF, the same chat format as a Go template, the same system prompt."""
    lines = [f"FROM ./{gguf_file}", ""]
    template, stops = _ollama_template(jinja_template)
    if template:
        lines += [f'TEMPLATE """{template}"""', ""]
    lines += [f'SYSTEM """{system}"""', ""]
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def _ollama_template(jinja_template: str) -> tuple[str, list[str]]:
    """ChatML-family templates (Qwen, SmolLM) rendered as Ollama's Go template, thinking off."""
    if "<|im_start|>" not in jinja_template:
        # Ollama reads `tokenizer.chat_template` from the GGUF itself for other families.
        return "", []
    think = "<think>\n\n</think>\n\n" if "enable_thinking" in jinja_template else ""
    template = (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        f"<|im_start|>assistant\n{think}"
    )
    return template, ["<|im_end|>", "<|im_start|>"]


# ---------------------------------------------------------------- progress


@contextmanager
def _steps(enabled: bool) -> Iterator[Any]:
    """A rich progress display with one line per export step (silent when disabled)."""
    if not enabled:

        @contextmanager
        def quiet(_: str) -> Iterator[None]:
            yield

        yield quiet
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as bar:

        @contextmanager
        def step(description: str) -> Iterator[None]:
            task = bar.add_task(description, total=1)
            yield
            bar.update(task, completed=1)

        yield step
