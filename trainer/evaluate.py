"""Base vs twin on held-out conversations: the retraining quality gate (`twin eval`).

Two measurements, both deterministic (fixed sample choice, fp32, greedy decoding):
perplexity on the owner's held-out reply tokens (the same label mask as training), and
style metrics (`trainer.style`) of generated replies against what the owner really said.
Writes `eval.json`, `eval.md` and `eval.png` into the run directory.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.chatformat import clean_model_output, render_chat_pieces
from pipeline.errors import InputError
from pipeline.files import atomic_path, write_text_atomic
from trainer.config import ADAPTER_DIR, SETTINGS_FILE
from trainer.data import VAL_FILE, encode_all, epoch_batches, load_split, tokenize_pieces
from trainer.models import BaseModelRef
from trainer.style import style_distance, style_metrics

EVAL_JSON = "eval.json"
EVAL_MD = "eval.md"
EVAL_PNG = "eval.png"


@dataclass(slots=True)
class Probe:
    """A held-out conversation cut just before one of the owner's replies."""

    messages: list[dict[str, str]]
    reference: str


@dataclass(slots=True)
class EvalReport:
    """Held-out perplexity and style, base vs twin."""

    run_dir: Path
    samples: int
    base_perplexity: float
    twin_perplexity: float
    base_style: dict[str, Any]
    twin_style: dict[str, Any]
    examples: list[dict[str, str]] = field(default_factory=list)

    @property
    def base_style_distance(self) -> float:
        return style_distance(self.base_style)

    @property
    def twin_style_distance(self) -> float:
        return style_distance(self.twin_style)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir)
        data["base_style_distance"] = self.base_style_distance
        data["twin_style_distance"] = self.twin_style_distance
        return data

    def markdown(self) -> str:
        b, t = self.base_style, self.twin_style

        def rate(key: str) -> tuple[str, str, str]:
            return _pct(b[key]), _pct(t[key]), _pct(b[f"reference_{key}"])

        def diversity(s: dict[str, Any], prefix: str = "") -> str:
            return f"{s[f'{prefix}distinct_1']:.2f} / {s[f'{prefix}distinct_2']:.2f}"

        rows = [
            ("held-out perplexity (owner tokens)", f"{self.base_perplexity:.2f}",
             f"{self.twin_perplexity:.2f}", "—"),
            ("style distance to owner (the retrain gate's)", f"{self.base_style_distance:.3f}",
             f"{self.twin_style_distance:.3f}", "0"),
            ("reply-length distance to owner", f"{b['length_distance']:.2f}",
             f"{t['length_distance']:.2f}", "0"),
            ("mean reply length (chars)", f"{b['mean_length']:.1f}", f"{t['mean_length']:.1f}",
             f"{b['reference_mean_length']:.1f}"),
            ("replies with a face/sticker", *rate("face_sticker_rate")),
            ("replies with a catchphrase", *rate("catchphrase_rate")),
            ("no reply", *rate("no_reply_rate")),
            ("distinct-1 / distinct-2", diversity(b), diversity(t), diversity(b, "reference_")),
        ]  # fmt: skip
        lines = [
            f"# Evaluation of `{self.run_dir.name}` on {self.samples} held-out conversations",
            "",
            "| metric | base | twin | owner |",
            "| --- | ---: | ---: | ---: |",
            *(f"| {name} | {base} | {twin} | {owner} |" for name, base, twin, owner in rows),
            "",
            f"Catchphrases (from the owner's held-out replies): {', '.join(b['catchphrases']) or '—'}",
        ]
        return "\n".join(lines) + "\n"


def _pct(value: float) -> str:
    return f"{value:.0%}"


def probes(conversations: Sequence[list[dict[str, str]]]) -> list[Probe]:
    """Each conversation cut before its last owner reply that answers a friend."""
    out: list[Probe] = []
    for messages in conversations:
        for index in range(len(messages) - 1, 0, -1):
            if messages[index]["role"] == "assistant" and messages[index - 1]["role"] == "user":
                out.append(Probe(messages=list(messages[:index]), reference=messages[index]["content"]))
                break
    return out


def evaluate(
    run_dir: Path,
    data_dir: Path,
    *,
    max_samples: int = 64,
    seed: int = 0,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    progress: bool = True,
) -> EvalReport:
    """Score base and twin on `data_dir/val.jsonl`; write eval.json, eval.md, eval.png into `run_dir`."""
    import torch
    from peft import PeftModel

    from trainer.models import load_model, load_tokenizer

    run_dir, data_dir = Path(run_dir), Path(data_dir)
    if not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        raise InputError(run_dir, "not a finished training run (no adapter/); run `twin train` first")
    conversations = load_split(data_dir, VAL_FILE)
    chosen = sorted(
        random.Random(seed).sample(range(len(conversations)), min(max_samples, len(conversations)))
    )
    conversations = [conversations[i] for i in chosen]
    stored = json.loads((run_dir / SETTINGS_FILE).read_text(encoding="utf-8"))
    base = BaseModelRef(**stored["base"])
    max_len = int(stored["settings"].get("max_seq_len", 1024))

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(base)
    model = PeftModel.from_pretrained(
        load_model(base, dtype=torch.float32), str(run_dir / ADAPTER_DIR)
    ).eval()
    samples = encode_all(tokenizer, conversations, max_len)
    tests = probes(conversations)

    with _Progress(progress, total=4) as bar, torch.no_grad():
        with model.disable_adapter():
            base_ppl = perplexity(model, samples, tokenizer.pad_token_id or 0)
            bar.advance("base: held-out perplexity")
            base_replies = generate(
                model, tokenizer, tests, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
            bar.advance("base: replies generated")
        twin_ppl = perplexity(model, samples, tokenizer.pad_token_id or 0)
        bar.advance("twin: held-out perplexity")
        twin_replies = generate(model, tokenizer, tests, max_new_tokens=max_new_tokens, batch_size=batch_size)
        bar.advance("twin: replies generated")

    reference = [t.reference for t in tests]
    report = EvalReport(
        run_dir=run_dir,
        samples=len(conversations),
        base_perplexity=round(base_ppl, 4),
        twin_perplexity=round(twin_ppl, 4),
        base_style=style_metrics(base_replies, reference),
        twin_style=style_metrics(twin_replies, reference),
        examples=[
            {"prompt": t.messages[-1]["content"], "owner": t.reference, "base": b, "twin": w}
            for t, b, w in list(zip(tests, base_replies, twin_replies, strict=True))[:8]
        ],
    )
    write_text_atomic(run_dir / EVAL_JSON, json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    write_text_atomic(run_dir / EVAL_MD, report.markdown())
    plot_lengths(run_dir / EVAL_PNG, {"owner": reference, "base": base_replies, "twin": twin_replies})
    return report


def perplexity(model: Any, samples: Sequence[Any], pad_id: int) -> float:
    """exp(mean cross-entropy) over the owner's reply tokens, the training label mask."""
    from trainer.train import owner_loss

    total, count = 0.0, 0
    for batch in epoch_batches(samples, batch_size=4, row_len=2048, pack=True, pad_id=pad_id, seed=0):
        loss_sum, n = owner_loss(model, batch)
        total += float(loss_sum)
        count += n
    return math.exp(total / count) if count else float("nan")


def generate(
    model: Any, tokenizer: Any, tests: Sequence[Probe], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy replies, prompted with the same chat template the bot renders (thinking off).

    Tokenised as training tokenises: a special token typed inside a chat message stays text, so
    a held-out message cannot open a turn of its own (`trainer.data.tokenize_pieces`)."""
    import torch

    prompts = [prompt_ids(tokenizer, t.messages) for t in tests]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        # Left padding: every row's prompt ends where generation starts.
        enc = {
            "input_ids": torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch]),
            "attention_mask": torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch]),
        }
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in out[:, enc["input_ids"].shape[1] :]:
            replies.append(reply_text(tokenizer, row))
    return replies


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """A chat's generation prompt as token ids: template text with its special tokens, message
    content always plain text."""
    pieces = render_chat_pieces(
        tokenizer.chat_template,
        messages,
        add_generation_prompt=True,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
    )
    ids, _ = tokenize_pieces(tokenizer, "".join(piece.text for piece in pieces), pieces)
    return ids


def reply_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """A generated row as the bot would send it (`clean_model_output`).

    Decoded with its special tokens so that a turn the model ended with `<|im_end|>` and then
    carried on (`<|im_start|>user…`) is cut there, not read on as one reply.
    """
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return clean_model_output(text, extra_special=tokenizer.all_special_tokens)


def plot_lengths(path: Path, groups: dict[str, Sequence[str]]) -> None:
    """Reply-length histograms side by side (owner, base, twin), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.style import reply_length

    lengths = {name: [reply_length(r) for r in replies] for name, replies in groups.items()}
    top = max([1, *(max(v, default=0) for v in lengths.values())])
    bins = list(range(0, min(top, 80) + 2, max(1, min(top, 80) // 20 or 1)))
    figure, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3), sharey=True)
    for ax, (name, values) in zip(axes, lengths.items(), strict=True):
        ax.hist([min(v, bins[-1]) for v in values], bins=bins, color="#4c72b0")
        ax.set_title(f"{name} (mean {sum(values) / max(len(values), 1):.1f})")
        ax.set_xlabel("reply length (chars)")
    axes[0].set_ylabel("replies")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


class _Progress:
    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.bar, self.task = enabled, total, None, None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("eval {task.description}"), BarColumn(), TimeElapsedColumn())
            self.bar.start()
            self.task = self.bar.add_task("base: held-out perplexity", total=self.total)
        return self

    def advance(self, done: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=done)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
