"""One incremental retrain cycle: collect → build → train → gate → export → register → promote.

The bot keeps serving throughout: training runs in a child process at lower priority, the
candidate is served only if the gate passes, and `current` is switched atomically at the
very end. Whatever happens, `retrain-status.json` says what the cycle did and why.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bot.config import Config
from pipeline.errors import InputError, TwinError
from pipeline.files import private_dir
from pipeline.records import Message
from pipeline.registry import (
    ADAPTER_DIR,
    INTERRUPTED,
    current_version,
    get_version,
    next_window_start,
    now_iso,
    read_status,
)
from pipeline.registry_ops import (
    CurrentMoved,
    append_cycle,
    promote,
    prune,
    register,
    retrain_lock,
    write_status,
)
from trainer.data import dataset_hash
from trainer.style import style_distance

if TYPE_CHECKING:
    from pipeline.registry import ModelVersion

log = logging.getLogger(__name__)

WORK_DIR = ".retrain"  # inside the registry; a dot-name is never taken for a version
STAGES = ("collect", "build", "train", "evaluate", "export", "promote")
TRAIN_LOG = "train.log"
PROGRESS_FILE = "train-progress.json"
SETTLE_SECONDS = 5
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# The status file's loss history (the console's live curve) holds at most this many points.
MAX_LOSS_POINTS = 400


@dataclass(slots=True)
class CycleResult:
    """How a cycle ended: promoted, rejected (by the gate), skipped (too little data) or failed."""

    state: str
    message: str
    reason: str = ""
    version: str | None = None
    serving: str | None = None
    new_samples: int = 0
    eval: dict = field(default_factory=dict)


@dataclass(slots=True)
class GateDecision:
    """Whether the candidate may serve, and the one-line reason recorded either way."""

    passed: bool
    reason: str


@dataclass(slots=True)
class EvalNumbers:
    """The two numbers the gate compares (lower is better for both)."""

    perplexity: float
    style_distance: float


class TrainingFailed(TwinError):
    """The training child process exited with an error or was killed."""


# ---------------------------------------------------------------- pure core


def gate(
    candidate: EvalNumbers, serving: EvalNumbers, *, ppl_tolerance: float, style_tolerance: float
) -> GateDecision:
    """Pass unless the candidate is worse than serving beyond tolerance on either number."""

    def bad(x: float) -> bool:
        return x is None or math.isnan(x) or math.isinf(x)

    if bad(candidate.perplexity) or bad(candidate.style_distance):
        return GateDecision(False, f"candidate evaluation is not finite ({_numbers(candidate)})")
    ppl_limit = serving.perplexity * (1 + ppl_tolerance)
    style_limit = serving.style_distance + style_tolerance
    summary = f"candidate {_numbers(candidate)} vs serving {_numbers(serving)}"
    if candidate.perplexity > ppl_limit:
        return GateDecision(
            False, f"perplexity worse beyond tolerance {ppl_tolerance:.0%} (limit {ppl_limit:.3f}): {summary}"
        )
    if candidate.style_distance > style_limit:
        return GateDecision(
            False,
            f"style distance worse beyond tolerance {style_tolerance} (limit {style_limit:.3f}): {summary}",
        )
    return GateDecision(True, f"within tolerance: {summary}")


def _numbers(e: EvalNumbers) -> str:
    return f"ppl {e.perplexity:.3f}, style {e.style_distance:.3f}"


def split_heldout(samples: Sequence[dict], ratio: float) -> tuple[list[dict], list[dict]]:
    """Hold out the newest `ratio` share (at least one when there are two or more) for the gate."""
    samples = list(samples)
    if ratio <= 0 or len(samples) < 2:
        return samples, []
    n = min(max(1, round(len(samples) * ratio)), len(samples) - 1)
    return samples[:-n], samples[-n:]


def add_loss_point(losses: list[list[float]], step: int, loss: float, cap: int = MAX_LOSS_POINTS) -> None:
    """Append [step, loss] to a loss history kept within `cap` points: when full, every other
    point is dropped (the newest kept), so older history grows coarser and the file stays small."""
    if losses and losses[-1][0] == step:
        losses[-1][1] = loss
        return
    if len(losses) >= cap:
        newest = losses[-1]
        del losses[1::2]  # the first point stays: the curve always starts where training did
        if losses[-1] is not newest:
            losses.append(newest)
    losses.append([step, loss])


def replay_share(original: Sequence[dict], new_count: int, ratio: float, seed: int) -> list[dict]:
    """`ratio` original samples per new one, drawn without replacement, reproducibly."""
    want = min(len(original), round(new_count * ratio))
    return random.Random(seed).sample(list(original), want) if want else []


# ---------------------------------------------------------------- status


class StatusFile:
    """The cycle's entry in `retrain-status.json`, rewritten atomically at each change."""

    def __init__(self, registry: Path, serving: str | None) -> None:
        self.registry = registry
        previous = read_status(registry)
        if previous.get("state") == "running":
            # We hold the lock, so that cycle died before it could record its end: log it now.
            self._log(
                {**previous, "state": INTERRUPTED, "reason": "the cycle stopped without recording its end"}
            )
        last = {k: previous.get(k) for k in ("state", "reason", "finished", "version")} if previous else None
        self.data: dict = {
            "state": "running",
            "stage": STAGES[0],
            "progress": 0.0,
            "started": now_iso(),
            "finished": None,
            "updated": now_iso(),
            "pid": os.getpid(),
            "serving": serving,
            "version": None,
            "new_samples": None,
            "reason": "",
            "eval": {},
            "losses": [],
            "last": last if last and last.get("state") != "running" else previous.get("last"),
        }
        self._write()

    def update(self, **fields: object) -> None:
        self.data.update(fields)
        self._write()

    def stage(self, name: str) -> None:
        log.info("retrain: stage %s", name)
        self.update(stage=name, progress=0.0)

    def finish(self, result: CycleResult) -> None:
        self.update(
            state=result.state,
            reason=result.reason,
            finished=now_iso(),
            version=result.version,
            serving=result.serving,
            eval=result.eval,
            progress=1.0 if result.state == "promoted" else self.data["progress"],
        )
        self._log({**self.data, "new_samples": result.new_samples or self.data.get("new_samples")})

    def _log(self, data: dict) -> None:
        """Add the cycle to the registry's cycle log; a failure to log never fails the cycle."""
        entry = {
            key: data.get(key) for key in ("started", "finished", "state", "stage", "version", "serving")
        }
        entry.update(
            new_samples=data.get("new_samples"),
            reason=data.get("reason") or "",
            eval=data.get("eval") or {},
            loss=data.get("loss"),
            steps=data.get("steps"),
        )
        try:
            append_cycle(self.registry, entry)
        except OSError as exc:
            log.warning("retrain: could not add the cycle to the cycle log (%s)", exc)

    def _write(self) -> None:
        self.data["updated"] = now_iso()
        write_status(self.registry, self.data)


# ---------------------------------------------------------------- stages (I/O)


def collect_messages(settings: Config, since: int) -> list[Message]:
    """The store's messages at or after `since` as records: everyone's, the owner's own, and
    the twin's replies only where an operator approved them."""
    return list(stream_messages(settings, since))


def stream_messages(settings: Config, since: int, before: int | None = None) -> Iterator[Message]:
    """`collect_messages` (and before `before`, when given), streamed: a long history never sits
    in memory whole."""
    from bot.store import iter_messages_since

    if not settings.twin_db.is_file():
        raise InputError(settings.twin_db, "no conversation store here (TWIN_DB); has the bot run yet?")
    try:
        for stored in iter_messages_since(
            settings.twin_db,
            since,
            key=settings.twin_db_key or "",
            include_approved_twin=settings.twin_retrain_include_approved,
            before_ts=before,
        ):
            yield to_record(stored)
    except Exception as exc:  # sqlite3/sqlcipher errors: wrong key, not a database
        raise InputError(
            settings.twin_db, f"cannot read the conversation store ({exc}); check TWIN_DB_KEY"
        ) from None


def context_history(settings: Config, before: int) -> Iterator[Message]:
    """Everything said before `before` (a cycle's first message), oldest first, for its samples'
    memory and examples: the imported history of TWIN_EXAMPLES_MESSAGES and the store's rows,
    as the live bot knows them when it answers."""
    from pipeline.records import iter_messages

    imported = settings.twin_examples_messages
    older = iter_messages(imported) if imported is not None and imported.is_file() else iter(())
    stored = stream_messages(settings, 0, before=before)
    return heapq.merge((m for m in older if m.time < before), stored, key=lambda m: m.time)


def to_record(stored) -> Message:
    """A store row as the pipeline's message record; `is_self` is the owner's (or approved twin's) word."""
    return Message(
        msg_id=stored.msg_id or f"store-{stored.id}",
        chat_type=stored.chat_type,
        chat=stored.chat,
        sender=stored.sender,
        sender_name=stored.sender_name,
        is_self=stored.origin != "incoming",
        time=int(stored.time),
        text=stored.text,
        reply_to=stored.reply_to,
        kinds=list(stored.kinds),
    )


def dataset_settings_for(settings: Config):
    """The settings the original dataset was built with, so new samples are built the same way."""
    from pydantic import ValidationError

    from pipeline.dataset.settings import DatasetSettings

    original = settings.twin_retrain_dataset
    if original is None:
        # No original dataset: default build settings, with the persona the bot prompts with.
        return DatasetSettings(persona=settings.twin_persona)
    if not original.is_dir():
        raise InputError(original, "no such dataset directory (TWIN_RETRAIN_DATASET)")
    report = original / "report.json"
    if not report.is_file():
        raise InputError(report, "no report.json: build the original dataset with `twin build-dataset`")
    try:
        recorded = json.loads(report.read_text(encoding="utf-8")).get("settings") or {}
        recorded.get("llm", {}).pop("api_key", None)
        recorded["mix"], recorded["mix_ratio"] = "", 0.0  # general data is already in the replay share
        return DatasetSettings.model_validate(recorded)
    except (ValueError, AttributeError) as exc:
        detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        raise InputError(report, f"unusable dataset settings ({detail})") from None


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as exc:
        raise InputError(path, f"not a JSONL dataset file ({exc})") from None


def read_messages_rows(path: Path) -> list[dict]:
    """Original dataset rows for replay and the held-out set; they must be in the `messages` format."""
    rows = read_jsonl(path)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise InputError(
                path, f"line {number}: not an OpenAI `messages` sample (build it with --format openai)"
            )
    return [{"messages": row["messages"]} for row in rows]


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def training_threads(requested: int, serving_threads: int, cores: int) -> int:
    """Torch threads for retraining: `requested`, else the cores the bot's llama.cpp threads leave (≥ 1)."""
    return requested or max(1, cores - serving_threads)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on macOS
        return os.cpu_count() or 1


def retrain_threads(settings: Config) -> int:
    """`TWIN_RETRAIN_THREADS`, or the cores left beside the bot's `TWIN_N_THREADS` on this machine."""
    return training_threads(settings.twin_retrain_threads, settings.twin_n_threads, available_cores())


def thread_env(threads: int) -> dict[str, str]:
    """Environment bounding a process's OpenMP/MKL/OpenBLAS pools, which torch sizes when it is imported."""
    return dict.fromkeys(THREAD_ENV, str(threads))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Torch's intra-op threads bounded to `threads` within the block (this process's evaluation, export)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_training_child(train_settings: dict, work: Path, status: StatusFile, nice: int, threads: int) -> Path:
    """Train in a child process at lower priority on `threads` torch threads; its progress is
    copied into the status file."""
    spec = work / "train-settings.json"
    spec.write_text(json.dumps({**train_settings, "threads": threads}, default=str), encoding="utf-8")
    progress_file = work / PROGRESS_FILE
    log_path = work / TRAIN_LOG
    cmd = [sys.executable, "-m", "deploy.retrain", "train-child", str(spec), str(progress_file), str(nice)]
    # Training threads beyond the cores the bot leaves free would take turns with its generation
    # thread on every core, niceness or not; the env bounds pools torch starts besides its own.
    env = {**os.environ, **thread_env(threads)}
    with log_path.open("wb") as log_file:
        child = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        status.update(child_pid=child.pid)
        seen = None
        losses = status.data.setdefault("losses", [])
        try:
            while True:
                try:
                    code = child.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                # One writer for the status file (this process): the child writes only its progress.
                progress = _read_json(progress_file)
                if progress and progress != seen:
                    seen = progress
                    step, loss = progress.get("step"), progress.get("loss")
                    if isinstance(step, int) and isinstance(loss, (int, float)):
                        add_loss_point(losses, step, float(loss))
                    status.update(
                        progress=progress.get("progress", 0.0),
                        step=progress.get("step"),
                        steps=progress.get("steps"),
                        loss=progress.get("loss"),
                    )
        finally:
            if child.poll() is None:  # we are being interrupted: never leave training orphaned
                child.kill()
                child.wait()
    status.update(child_pid=None)
    if code != 0:
        tail = _last_line(log_path)
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        raise TrainingFailed(f"training crashed ({how}): {tail or 'no output'} (log: {log_path})")
    return Path(train_settings["output_dir"])


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines if ln]
    return lines[-1][:300] if lines else ""


def lower_priority(niceness: int, idle: bool = False) -> None:
    """Raise this process's niceness to at least `niceness` (never lower it: that needs root);
    with `idle`, also move it to Linux's SCHED_IDLE class, where it runs only on CPU time no
    ordinary process wants. Threads and children started afterwards inherit both."""
    current = os.nice(0)
    if niceness > current:
        os.nice(niceness - current)
    if idle and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError as exc:  # a sandbox may forbid it: the niceness still holds
            log.warning("could not run the retrain at idle priority (%s); niceness %d only", exc, niceness)


def _train_child_main(spec: Path, progress_file: Path, nice: int) -> int:
    """Entry of the training child: lower our priority, continue the serving adapter, train."""
    # Before torch is imported: Linux keeps a niceness per thread, and torch's pool threads
    # inherit it from this one only if they start after it is set.
    lower_priority(nice)
    from trainer.config import TrainSettings
    from trainer.train import train

    values = json.loads(spec.read_text(encoding="utf-8"))
    train(TrainSettings(**values), progress=False, on_step=_progress_writer(progress_file))
    return 0


def _progress_writer(progress_file: Path) -> Callable[[int, int, float], None]:
    """An `on_step` callback mirroring the trainer's step into `progress_file`, at most once a second."""
    last = [0.0]

    def on_step(step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if now - last[0] < 1.0 and step < total:
            return
        last[0] = now
        progress = {
            "progress": round(step / max(total, 1), 4),
            "step": step,
            "steps": total,
            "loss": round(loss, 4),
        }
        tmp = progress_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(progress), encoding="utf-8")
        os.replace(tmp, progress_file)
        log.info("retrain: step %d/%d loss %.4f", step, total, loss)

    return on_step


# ---------------------------------------------------------------- the cycle


def run_cycle(settings: Config, *, on_stage: Callable[[str], None] | None = None) -> CycleResult:
    """Run one cycle under the registry lock; a second concurrent call raises RetrainBusy."""
    registry = private_dir(Path(settings.twin_model))
    with retrain_lock(registry):
        serving = current_version(registry)
        status = StatusFile(registry, serving)
        work = registry / WORK_DIR
        shutil.rmtree(work, ignore_errors=True)
        private_dir(work)
        try:
            result = _cycle(settings, registry, serving, status, work, on_stage or (lambda _: None))
        except TwinError as exc:  # expected failures: the message is the whole story
            result = _failed(serving, str(exc))
        except Exception as exc:  # a crash anywhere leaves the old model serving, with the reason
            log.exception("retrain: cycle failed")
            result = _failed(serving, f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # SIGTERM (as SystemExit) or Ctrl-C: record it, then go
            status.finish(
                _failed(serving, f"interrupted ({type(exc).__name__}) during {status.data['stage']}")
            )
            raise
        status.finish(result)
        if result.state != "failed":
            shutil.rmtree(work, ignore_errors=True)  # keep a failed cycle's log for the operator
        log.info("retrain: %s", result.message)
        return result


def _failed(serving: str | None, reason: str) -> CycleResult:
    return CycleResult(
        "failed", f"retrain failed, still serving {serving}: {reason}", reason=reason, serving=serving
    )


@dataclass(slots=True)
class _CycleState:
    """What one cycle's stages hand each other."""

    settings: Config
    registry: Path
    serving: str
    serving_version: ModelVersion
    status: StatusFile
    work: Path
    since: int  # the serving model saw everything before this
    until: int = 0
    messages: list[Message] = field(default_factory=list)
    new_samples: int = 0
    heldout_samples: int = 0
    data_hash: str = ""
    gate_reason: str = ""
    eval: dict = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.work / "data"

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    @property
    def export_dir(self) -> Path:
        return self.work / "export"


def _cycle(
    settings: Config,
    registry: Path,
    serving: str | None,
    status: StatusFile,
    work: Path,
    on_stage: Callable[[str], None],
) -> CycleResult:
    if serving is None:
        raise InputError(
            registry, "nothing is serving yet: export a first version and `twin models promote` it"
        )
    serving_version = get_version(registry, serving)
    # The serving model saw everything up to its window's end; only later messages are new.
    since = next_window_start(registry, serving)
    cycle = _CycleState(settings, registry, serving, serving_version, status, work, since)

    def stage(name: str) -> None:
        status.stage(name)
        on_stage(name)

    stage("collect")
    _collect(cycle)
    stage("build")
    if (skipped := _build(cycle)) is not None:
        return skipped
    stage("train")
    _train(cycle)
    stage("evaluate")
    if (rejected := _evaluate(cycle)) is not None:
        return rejected
    stage("export")
    _export(cycle)
    _samples(cycle)
    stage("promote")
    return _promote(cycle)


def _collect(cycle: _CycleState) -> None:
    """The store's messages since the serving model's window, but for the newest few seconds."""
    # They wait for the next cycle: a message stamped just before the query but written just
    # after it would otherwise fall between two windows.
    cycle.until = int(time.time()) - SETTLE_SECONDS
    cycle.messages = [m for m in collect_messages(cycle.settings, cycle.since) if m.time <= cycle.until]


def _build(cycle: _CycleState) -> CycleResult | None:
    """New samples, a held-out share and a replay of the original data into `work/data`;
    a skipped result when there are too few new samples."""
    from pipeline.dataset.build import build_samples

    settings = cycle.settings
    build_settings = dataset_settings_for(settings)
    # The samples' system prompts know the whole history before the window, as the bot's do.
    needs_history = build_settings.memory or build_settings.examples > 0
    start = cycle.messages[0].time if cycle.messages else cycle.since
    history = context_history(settings, start) if needs_history else iter(())
    built = build_samples(cycle.messages, build_settings, history=history)
    samples = sorted(built, key=lambda sample: getattr(sample, "end", 0))
    cycle.new_samples = len(samples)
    cycle.status.update(new_samples=len(samples))
    if len(samples) < settings.twin_retrain_min_samples:
        reason = (
            f"{len(samples)} new samples since the last cycle, fewer than the minimum "
            f"{settings.twin_retrain_min_samples} (TWIN_RETRAIN_MIN_SAMPLES)"
        )
        return CycleResult(
            "skipped",
            f"not retraining: {reason}",
            reason=reason,
            serving=cycle.serving,
            new_samples=len(samples),
        )

    new_train, new_heldout = split_heldout([_row(s) for s in samples], settings.twin_retrain_heldout_ratio)
    original = settings.twin_retrain_dataset
    original_train = read_messages_rows(original / "train.jsonl") if original else []
    original_val = read_messages_rows(original / "val.jsonl") if original else []
    replay = replay_share(
        original_train, len(new_train), settings.twin_retrain_replay_ratio, settings.twin_retrain_seed
    )
    data_dir = private_dir(cycle.data_dir)
    train_rows = new_train + replay
    random.Random(settings.twin_retrain_seed).shuffle(train_rows)
    write_jsonl(data_dir / "train.jsonl", train_rows)
    write_jsonl(data_dir / "val.jsonl", original_val + new_heldout)
    cycle.data_hash = dataset_hash(data_dir)  # as `twin train` records it
    cycle.heldout_samples = len(original_val) + len(new_heldout)
    log.info(
        "retrain: %d new samples (%d held out), %d replayed", len(samples), len(new_heldout), len(replay)
    )
    return None


def _train(cycle: _CycleState) -> None:
    """Continue the serving adapter on the cycle's data, in a child process at lower priority."""
    settings = cycle.settings
    train_settings = {
        **base_model_of(settings, cycle.serving_version),
        "data": str(cycle.data_dir),
        "output_dir": str(cycle.run_dir),
        "max_steps": settings.twin_retrain_max_steps,
        "lr": settings.twin_retrain_learning_rate,
        "seed": settings.twin_retrain_seed,
    }
    adapter = cycle.serving_version.path / ADAPTER_DIR
    if adapter.is_dir():
        train_settings["init_adapter"] = str(adapter)
    run_training_child(
        train_settings, cycle.work, cycle.status, settings.twin_retrain_nice, retrain_threads(settings)
    )


def _evaluate(cycle: _CycleState) -> CycleResult | None:
    """Candidate and serving adapter on the same held-out set; a rejected result unless the gate passes."""
    settings = cycle.settings
    with torch_threads(retrain_threads(settings)):
        candidate = evaluate_numbers(cycle.run_dir, cycle.data_dir, settings)
        cycle.status.update(progress=0.5)
        serving_run = serving_run_dir(cycle.serving_version, cycle.run_dir, cycle.work)
        current = evaluate_numbers(serving_run, cycle.data_dir, settings)
    decision = gate(
        candidate,
        current,
        ppl_tolerance=settings.twin_retrain_ppl_tolerance,
        style_tolerance=settings.twin_retrain_style_tolerance,
    )
    cycle.eval = {
        "candidate": asdict(candidate),
        "serving": asdict(current),
        "heldout_samples": cycle.heldout_samples,
    }
    cycle.gate_reason = decision.reason
    if decision.passed:
        return None
    return CycleResult(
        "rejected",
        f"candidate rejected by the quality gate, still serving {cycle.serving}: {decision.reason}",
        reason=decision.reason,
        serving=cycle.serving,
        new_samples=cycle.new_samples,
        eval=cycle.eval,
    )


def _export(cycle: _CycleState) -> None:
    """The candidate merged, converted and quantised into `work/export`."""
    from trainer.export import export

    with torch_threads(retrain_threads(cycle.settings)):
        export(cycle.run_dir, cycle.export_dir, quants=tuple(cycle.settings.retrain_quant_list))


def _samples(cycle: _CycleState) -> None:
    """The candidate's replies to the registry's probes, in the export so they move with it."""
    from deploy.samples import llama_generate, samples_for_export

    generate = llama_generate(cycle.settings, n_threads=retrain_threads(cycle.settings))
    samples_for_export(cycle.settings, cycle.registry, cycle.export_dir, generate)


def _promote(cycle: _CycleState) -> CycleResult:
    """Register the export as a version and serve it, unless an operator switched meanwhile."""
    version = register(
        cycle.registry,
        cycle.export_dir,
        parent=cycle.serving,
        data_window={
            "since": cycle.since,
            "until": cycle.until,
            "messages": len(cycle.messages),
            "samples": cycle.new_samples,
        },
        dataset_hash=cycle.data_hash,
        eval_numbers={**cycle.eval["candidate"], "gate": cycle.eval, "gate_reason": cycle.gate_reason},
        move=True,
    )
    try:
        # Checked and switched under one lock: an operator's switch meanwhile stands.
        promote(
            cycle.registry,
            version.name,
            reason=f"retrain gate passed: {cycle.gate_reason}",
            by="retrain",
            expect_current=cycle.serving,
        )
    except CurrentMoved:
        now_serving = current_version(cycle.registry)
        reason = f"{now_serving} was promoted during the cycle; {version.name} is registered but not served"
        return CycleResult(
            "registered",
            f"registered {version.name} without promoting it: {reason} "
            f"(`twin models promote {version.name}` serves it)",
            reason=reason,
            version=version.name,
            serving=now_serving,
            new_samples=cycle.new_samples,
            eval=cycle.eval,
        )
    removed = prune(cycle.registry, cycle.settings.twin_retrain_keep)
    if removed:
        log.info("retrain: removed old versions %s", ", ".join(removed))
    return CycleResult(
        "promoted",
        f"promoted {version.name} (parent {cycle.serving}, {cycle.new_samples} new samples): "
        f"{cycle.gate_reason}",
        reason=cycle.gate_reason,
        version=version.name,
        serving=version.name,
        new_samples=cycle.new_samples,
        eval=cycle.eval,
    )


def base_model_of(settings: Config, version) -> dict:
    """The base the serving adapter applies to: the setting, else what its export recorded."""
    if settings.twin_retrain_base_model:
        return {"base_model": settings.twin_retrain_base_model}
    source = version.manifest.get("base_source") or {}
    if source.get("source"):
        return {"base_model": str(source["source"]), "gguf_file": source.get("gguf_file")}
    if version.manifest.get("base"):
        return {"base_model": str(version.manifest["base"])}
    raise InputError(version.path / "manifest.json", "names no base model; set TWIN_RETRAIN_BASE_MODEL")


def _row(sample: object) -> dict:
    """A sample as a dataset line in the OpenAI `messages` format (what train.jsonl holds)."""
    messages = sample["messages"] if isinstance(sample, dict) else sample.messages  # type: ignore[attr-defined]
    return {"messages": messages}


def serving_run_dir(version, candidate_run: Path, work: Path) -> Path:
    """The serving adapter as a run directory like the candidate's (same base, same settings),
    so that both are evaluated by exactly the same code on exactly the same data."""
    run = work / "serving-run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    for name in ("settings.json", "metrics.json"):
        if (candidate_run / name).is_file():
            shutil.copy2(candidate_run / name, run / name)
    adapter = version.path / ADAPTER_DIR
    if not adapter.is_dir():
        raise InputError(adapter, "the serving version has no adapter to evaluate or continue from")
    shutil.copytree(adapter, run / ADAPTER_DIR)
    return run


def evaluate_numbers(run_dir: Path, data_dir: Path, settings: Config) -> EvalNumbers:
    """Held-out perplexity and style distance of one run's adapter on the cycle's held-out set."""
    from trainer.evaluate import evaluate

    report = evaluate(
        run_dir,
        data_dir,
        max_samples=settings.twin_retrain_eval_samples,
        seed=settings.twin_retrain_seed,
        progress=False,
    )
    return EvalNumbers(
        perplexity=float(report.twin_perplexity), style_distance=style_distance(report.twin_style)
    )


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "train-child":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return _train_child_main(Path(argv[1]), Path(argv[2]), int(argv[3]))
    print("usage: python -m deploy.retrain train-child SPEC PROGRESS NICE (internal)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
