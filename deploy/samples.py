"""Sample replies per version: the same held-out prompts (`probes.jsonl` in the registry)
answered greedily by each version's GGUF (`<version>/samples.json`), for the console's
Versions page to show next to the owner's real reply. `twin models samples` and the retrain
cycle (for its candidate, before it is registered) write them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from bot.config import Config
from pipeline import registry as model_registry
from pipeline.chatformat import clean_model_output
from pipeline.errors import InputError
from pipeline.files import write_text_atomic
from pipeline.registry import PROBES_FILE, SAMPLES_FILE, Probe

log = logging.getLogger(__name__)
DEFAULT_PROBES = 8
SAMPLE_SEED = 0  # greedy anyway; fixed so that a rerun answers the same
# A GGUF and the prompts → one reply per prompt (tests swap in their own).
Generate = Callable[[Path, Sequence[Sequence[dict[str, str]]]], list[str]]


def probe_of(row: dict) -> Probe | None:
    """A dataset line as a probe: everything before the final assistant turn, and that turn."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or len(messages) < 2:
        return None
    try:
        turns = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    except (KeyError, TypeError):
        return None
    if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
        return None
    if not any(turn["role"] == "user" for turn in turns[:-1]):
        return None
    ident = hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode()).hexdigest()[:12]
    return Probe(ident, turns[:-1], turns[-1]["content"])


def pick_probes(rows: Sequence[dict], count: int, *, latest: bool = False) -> list[Probe]:
    """`count` probes, deterministically: spread evenly over the rows, or with `latest` the last ones."""
    candidates = [probe for row in rows if (probe := probe_of(row)) is not None]
    if latest or len(candidates) <= count:
        return candidates[-count:] if count else []
    return [candidates[i * len(candidates) // count] for i in range(count)]


def _jsonl(path: Path) -> list[dict]:
    from deploy.retrain import read_jsonl

    return read_jsonl(path)


def candidate_probes(settings: Config, registry: Path, count: int) -> list[Probe]:
    """Held-out samples from the original dataset (TWIN_RETRAIN_DATASET), else the serving
    version's recorded dataset, else the store's latest owner replies built (and redacted) as
    the dataset builds them."""
    sources = []
    if settings.twin_retrain_dataset:
        sources.append(Path(settings.twin_retrain_dataset) / "val.jsonl")
    serving = model_registry.current_version(registry)
    if serving is not None:
        recorded = model_registry.read_manifest(registry / serving).get("dataset")
        if isinstance(recorded, str) and recorded:
            sources.append(Path(recorded) / "val.jsonl")
    for source in sources:
        if source.is_file():
            probes = pick_probes(_jsonl(source), count)
            if probes:
                return probes
    from deploy.retrain import collect_messages, dataset_settings_for
    from pipeline.dataset.build import build_samples

    samples = sorted(
        build_samples(collect_messages(settings, 0), dataset_settings_for(settings)),
        key=lambda sample: getattr(sample, "end", 0),
    )
    return pick_probes([{"messages": sample.messages} for sample in samples], count, latest=True)


def write_probes(registry: Path, probes: Sequence[Probe]) -> None:
    lines = (
        json.dumps({"id": p.id, "messages": p.messages, "owner_reply": p.owner_reply}, ensure_ascii=False)
        for p in probes
    )
    write_text_atomic(registry / PROBES_FILE, "".join(line + "\n" for line in lines))


def ensure_probes(settings: Config, registry: Path, count: int, *, refresh: bool = False) -> list[Probe]:
    """The registry's probes, picked (once) when missing or with `refresh`."""
    probes = [] if refresh else model_registry.read_probes(registry)
    if probes:
        return probes
    probes = candidate_probes(settings, registry, count)
    if not probes:
        raise InputError(
            registry, "no held-out samples to probe the versions with (no dataset, no owner replies)"
        )
    write_probes(registry, probes)
    return probes


def llama_generate(settings: Config, max_tokens: int | None = None, n_threads: int | None = None) -> Generate:
    """Greedy replies from a GGUF through llama.cpp, prompted exactly as the bot prompts it."""
    from bot.backends import LlamaCppBackend, SamplingSettings

    sampling = SamplingSettings(
        max_tokens=max_tokens or settings.twin_max_tokens,
        temperature=0.0,
        top_p=1.0,
        seed=SAMPLE_SEED,
        repeat_penalty=settings.twin_repeat_penalty,
    )

    def generate(gguf: Path, prompts: Sequence[Sequence[dict[str, str]]]) -> list[str]:
        async def run() -> list[str]:
            backend = LlamaCppBackend(
                gguf,
                gguf.parent.name,
                n_threads=n_threads or settings.twin_n_threads,
                n_ctx=settings.twin_n_ctx,
                sampling=sampling,
                special_tokens=settings.twin_special_tokens,
            )
            try:
                await backend.start()
                return [(await backend.generate(prompt)).text for prompt in prompts]
            finally:
                await backend.close()

        return asyncio.run(run())

    return generate


def write_samples(model_dir: Path, probes: Sequence[Probe], digest: str, generate: Generate) -> Path:
    """`model_dir`'s replies to `probes` (made for the probes hashed `digest`) in samples.json."""
    manifest = model_registry.read_manifest(model_dir)
    gguf = model_registry.pick_gguf(model_dir, manifest)
    texts = generate(gguf, [probe.messages for probe in probes])
    replies = [
        {"id": probe.id, "text": clean_model_output(text)} for probe, text in zip(probes, texts, strict=True)
    ]
    path = model_dir / SAMPLES_FILE
    payload = {"probes": digest, "replies": replies, "created": model_registry.now_iso()}
    write_text_atomic(path, json.dumps(payload, ensure_ascii=False, indent=2) + "\n")
    return path


def lacking_samples(registry: Path, versions: Sequence[str], digest: str) -> list[str]:
    """The versions without samples for the current probes."""
    return [v for v in versions if not model_registry.read_samples(registry / v, digest)]


def fill_samples(
    settings: Config,
    registry: Path,
    generate: Generate,
    *,
    versions: Sequence[str] | None = None,
    count: int = DEFAULT_PROBES,
    refresh: bool = False,
    on_version: Callable[[str], None] = lambda _: None,
) -> tuple[list[str], dict[str, str]]:
    """Samples for every version (or `versions`) lacking them; (filled, failed: version → why)."""
    probes = ensure_probes(settings, registry, count, refresh=refresh)
    digest = model_registry.probes_hash(registry)
    assert digest is not None
    names = list(versions) if versions else model_registry.version_names(registry)
    for name in names:
        model_registry.version_dir(registry, name)  # a bad or missing name refuses the whole run
    todo = names if refresh else lacking_samples(registry, names, digest)
    filled, failed = [], {}
    for name in todo:
        on_version(name)
        try:
            write_samples(registry / name, probes, digest, generate)
            filled.append(name)
        except Exception as exc:  # one version that will not load must not stop the others
            failed[name] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            log.warning("samples: %s failed: %s", name, failed[name])
    return filled, failed


def samples_for_export(settings: Config, registry: Path, export_dir: Path, generate: Generate) -> bool:
    """The retrain candidate's samples, into its export directory before it is registered;
    any failure is a warning (the cycle goes on). True when written."""
    try:
        probes = ensure_probes(settings, registry, DEFAULT_PROBES)
        digest = model_registry.probes_hash(registry)
        assert digest is not None
        write_samples(export_dir, probes, digest, generate)
    except Exception as exc:
        log.warning("retrain: no sample replies for the candidate: %s", str(exc)[:300])
        return False
    return True
