"""The one training loop, for every trainer: encoder heads (triplet, Barlow Twins) and rerankers (MatchNet, BEiT).

A trainer hands the loop a `Trainer`: the module it trains, its optimizer, a plan per epoch (how many
steps, and the loss of step i), and a validation function (scores on held-out data, and the one scalar
to maximise). The loop owns everything else, the same way for all of them: seeding, the optimizer
steps with the time budget checked after each one, validation after every epoch, keeping the best
epoch, patience, the trainer's guards, per-epoch atomic checkpoints with exact resume; and `publish`
is the one way a trained model and its card reach a registry.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from simsearch.atomic import atomic_path, staged_dir
from simsearch.devices import Device
from simsearch.encoders.cards import CARD, Card, EncoderDetails, RerankerDetails
from simsearch.errors import SimsearchError
from simsearch.paths import training_cache

log = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """Raised by a trainer (its guard, epoch plan or validation) to stop training and keep the best epoch so far;
    the message says why."""


@dataclass(frozen=True)
class Budget:
    """A training command's time budget (--max-minutes), counted from the command's start, so the data
    preparation (embedding, caching) counts too, with time kept back for the export after the last epoch."""

    minutes: float
    started: float = field(default_factory=time.perf_counter)

    def spent(self) -> float:
        return time.perf_counter() - self.started

    def over(self) -> bool:
        reserve = min(60.0, 6.0 * self.minutes)  # seconds for the ONNX export and registration (~30 s measured)
        return self.spent() > self.minutes * 60 - reserve


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's optimizer steps: step(i) -> (loss of step i, counts summed over the epoch, e.g. triplets mined)."""

    steps: int
    step: Callable[[int], tuple[torch.Tensor, dict[str, int]]]


def no_guard(history: list[dict]) -> None:
    """A trainer without guards of its own."""


@dataclass(frozen=True)
class Trainer:
    """What a trainer gives the loop."""

    module: nn.Module  # everything it trains: checkpointed, and left holding the best epoch
    optimizer: torch.optim.Optimizer
    plan: Callable[[int], EpochPlan]  # epoch (0-based) -> its steps; called after the epoch is seeded
    validate: Callable[[], tuple[dict[str, float], float]]  # held-out scores (recorded) and the scalar to maximise
    score_name: str  # what that scalar is, for messages: "held-out balanced accuracy"
    guard: Callable[[list[dict]], None] = no_guard  # after each epoch is recorded; raises TrainingStopped to stop


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    patience: int  # epochs without a better held-out score before stopping
    budget: Budget
    seed: int = 0


@dataclass(frozen=True)
class FitResult:
    best: dict  # the kept epoch's row
    history: list[dict]  # a row per epoch: epoch, loss, steps, the trainer's counts and scores, score, seconds
    stopped: str

    def validation(self, held_out: str) -> dict:
        """The card's validation record; held_out: what the scores were measured on."""
        return {"held_out": held_out, "history": self.history, "best": self.best, "stopped": self.stopped}


def checkpoint_path(config) -> Path:
    """Where a run's per-epoch checkpoint lives: keyed by the whole config, so only the same run resumes it."""
    # Left out: a run may be resumed with more epochs, a longer budget, or on another device.
    fields = {k: v for k, v in asdict(config).items() if k not in ("epochs", "max_minutes", "device")}
    key = hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:16]
    return training_cache() / f"checkpoint-{config.name}-{key}.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:  # a run killed while saving keeps the previous epoch's checkpoint
        torch.save(state, tmp)


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _run_steps(trainer: Trainer, plan: EpochPlan, budget: Budget, label: str, on_progress) -> dict:
    """One epoch's optimizer steps; stops early when the budget is spent (an epoch may be long)."""
    total, done, counts = 0.0, 0, {}
    for i in range(plan.steps):
        loss, step_counts = plan.step(i)
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
        total += loss.item()
        done += 1
        for k, v in step_counts.items():
            counts[k] = counts.get(k, 0) + int(v)
        if on_progress and (i % 20 == 0 or i + 1 == plan.steps):
            on_progress(f"{label} loss {total / done:.4f}", i + 1, plan.steps)
        if budget.over():
            break
    return {"loss": total / max(done, 1), "steps": done, **counts}


def fit(trainer: Trainer, cfg: LoopConfig, checkpoint: Path | None = None, on_progress=None) -> FitResult:
    """Train epoch by epoch; leaves trainer.module holding the best epoch, in eval mode, on the CPU.

    Every epoch is seeded by its number (torch's generator: shuffles, dropout; numpy's global one, which
    pytorch-metric-learning's sampler draws from), so a trainer whose plan depends only on the epoch number
    trains the same however often the run was interrupted. checkpoint: written after every epoch (module,
    optimizer, history, best epoch so far, and a guard's or patience's stop); a run that finds one resumes
    after its last epoch, or goes straight to the end when it had stopped.
    """
    module, budget = trainer.module, cfg.budget
    history: list[dict] = []
    best, best_state, stopped = None, None, ""  # stopped: a final stop (guard, patience), kept in the checkpoint
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        module.load_state_dict(state["module"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        history, best, best_state, stopped = state["history"], state["best"], state["best_state"], state["stopped"]
        log.info("resuming from %s after epoch %d", checkpoint, len(history))
    out_of_time = False
    while not stopped and not out_of_time and len(history) < cfg.epochs:
        epoch = len(history)
        torch.manual_seed(cfg.seed + epoch)
        np.random.seed(cfg.seed + epoch)
        try:
            module.train()
            row = {"epoch": epoch + 1, **_run_steps(trainer, trainer.plan(epoch), budget,
                                                   f"epoch {epoch + 1}/{cfg.epochs}", on_progress)}
            scores, score = trainer.validate()
        except TrainingStopped as e:  # within the epoch: it is not recorded
            stopped = str(e)
        else:
            # Plain floats: the checkpoint is read back with weights_only, and the card is JSON.
            row.update({k: float(v) for k, v in scores.items()}, score=float(score), seconds=budget.spent())
            history.append(row)
            log.info("epoch %d: loss %.4f, %s (%d steps)", row["epoch"], row["loss"],
                     ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), row["steps"])
            if best is None or row["score"] > best["score"]:
                best, best_state = row, _clone(module.state_dict())
            try:
                trainer.guard(history)
            except TrainingStopped as e:
                stopped = str(e)
            if not stopped and row["epoch"] - best["epoch"] >= cfg.patience:
                stopped = f"no better {trainer.score_name} for {cfg.patience} epochs"
            out_of_time = budget.over()
        if stopped:
            log.warning("stopping after epoch %d: %s; keeping epoch %s", len(history), stopped,
                        best["epoch"] if best else "none")
        if checkpoint is not None and best is not None:
            save_checkpoint(checkpoint, {"module": module.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                                         "history": history, "best": best, "best_state": best_state,
                                         "stopped": stopped})
    if best is None:
        raise SimsearchError(f"training stopped before any epoch was validated: {stopped}")
    if out_of_time and not stopped:
        stopped = f"time budget of {budget.minutes} minutes reached"
        log.warning("time budget reached in epoch %d", history[-1]["epoch"])
    module.load_state_dict(best_state)
    module.cpu().eval()  # exported and saved from the CPU
    return FitResult(best, history, stopped or "epochs done")


def hyper_parameters(config) -> dict:
    """A trainer's config as JSON values: paths and devices as strings, tuples as lists."""
    return {k: str(v) if isinstance(v, (Path, Device)) else list(v) if isinstance(v, tuple) else v
            for k, v in asdict(config).items()}


def publish(config, method: str, base: str, details: EncoderDetails | RerankerDetails, result: FitResult,
            held_out: str, budget: Budget, root: Path, write_files: Callable[[Path], None],
            checkpoint: Path | None, checks: dict | None = None) -> Card:
    """The one way a trained model reaches its registry (root: trained_dir or rerankers_dir).

    write_files(folder) writes the model's files into a staging folder beside root/<name>; the card, with
    the sha256 of every ONNX file there, is written beside them, the folder swapped in atomically, and the
    run's checkpoint removed (only now: a run killed while exporting resumes from it). checks: an encoder's
    figures against its base (training/encoder_training.py: generalisation_checks), kept in its validation.
    """
    from simsearch import __version__
    from simsearch.encoders.export import sha256_file

    seconds = budget.spent()
    with staged_dir(root / config.name) as work:
        write_files(work)
        card = Card(
            kind="encoder" if isinstance(details, EncoderDetails) else "reranker", name=config.name, method=method,
            base=base, data=str(config.data), split=config.split, hyper_parameters=hyper_parameters(config),
            validation={**result.validation(held_out), **({"checks": checks} if checks else {})}, train_seconds=seconds,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), simsearch_version=__version__,
            onnx_sha256={p.name: sha256_file(p) for p in sorted(work.glob("*.onnx"))}, details=details,
        )
        (work / CARD).write_text(card.to_json())
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    log.info("%s %s registered: %s", card.kind, card.name, card.summary())
    return card
