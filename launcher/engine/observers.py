"""Observers of the training loop: what happens after each optimiser step besides the step.

* ``MetricsObserver``: ``metrics.jsonl`` every ``train.log_every_steps`` and the progress bar;
* ``SampleKeysObserver``: each rank's sample keys per step (``train.sample_keys_log``);
* ``EvalObserver``: the held-out evaluation every ``eval.every_steps``;
* ``CheckpointObserver``: a checkpoint when due or when a stop signal arrived, then
  ``Preempted``.

Every rank calls every observer (evaluation and checkpoints are collective).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from clicktower.launcher.engine.checkpoint import Checkpointer
from clicktower.launcher.engine.loop import StepReport, TrainConfig, TrainLoop
from clicktower.launcher.engine.metrics import MetricsLog, SampleKeysLog
from clicktower.launcher.engine.periodic_eval import PeriodicEvaluator
from clicktower.launcher.engine.preemption import Preempted, PreemptionHandler
from clicktower.launcher.engine.tracking import Tracker

logger = logging.getLogger(__name__)


class MetricsObserver:
    """The ``metrics.jsonl`` lines (mean loss over the window, lr, temperature, pairs/s, bad
    sample counts and read retries, upload retries), the same values (plus step and data-wait times) to the experiment
    trackers, and rank 0's progress bar.

    Args:
        metrics: the run's ``metrics.jsonl`` writer.
        cfg: train config (``log_every_steps``, ``progress_bar``; the step count is the loop's).
        main_process: whether this rank shows the progress bar.
        tracker: the run's experiment trackers (None: none); its run is resumed from the
            checkpoint (this observer's state).
        counters: more counts for every line (``storage_counters``: read retries of all
            ranks, the checkpoint uploads' retries and failures, since this start).
    """

    name = "metrics"

    def __init__(self, metrics: MetricsLog, cfg: TrainConfig, main_process: bool,
                 tracker: Tracker | None = None, counters: Callable[[], dict[str, int]] | None = None) -> None:
        self.metrics, self.cfg, self.main_process, self.tracker = metrics, cfg, main_process, tracker
        self.counters = counters
        self.bar: Any = None
        self._reset_window()

    def _reset_window(self) -> None:
        self.window_loss, self.window_pairs, self.window_start = 0.0, 0, time.perf_counter()
        self.window_step_s, self.window_wait_s = 0.0, 0.0

    def state_dict(self) -> dict[str, Any]:
        """The tracker run to continue after a resume (empty without trackers)."""
        return {"tracker": self.tracker.state_dict() if self.tracker is not None else {}}

    def on_start(self, loop: TrainLoop, resumed: bool) -> None:
        from tqdm.auto import tqdm

        if not resumed:
            self.metrics.reset()  # a resumed run appends to its old file instead
        if self.tracker is not None:
            saved = loop.observer_states.get(self.name, {}).get("tracker") if resumed else None
            self.tracker.start(saved or None)
        self.bar = tqdm(total=loop.max_steps, initial=loop.step, desc="train", dynamic_ncols=True,
                        disable=not (self.cfg.progress_bar and self.main_process))
        self._reset_window()

    def after_step(self, loop: TrainLoop, report: StepReport) -> None:
        self.window_loss += float(report.loss)
        self.window_pairs += report.pairs
        self.window_step_s += report.step_time_s
        self.window_wait_s += report.data_wait_s
        self.bar.update(1)
        if report.step % self.cfg.log_every_steps and report.step != loop.max_steps:
            return
        elapsed = time.perf_counter() - self.window_start
        steps = report.step % self.cfg.log_every_steps or self.cfg.log_every_steps
        record = self.record(loop, report.step, self.window_loss / steps, self.window_pairs / max(elapsed, 1e-9))
        if self.counters is not None:
            record.update(self.counters())
        self.metrics.write(record)
        if self.tracker is not None:
            self.tracker.log_train(record, {"step_time_s": self.window_step_s / steps,
                                            "data_wait_s": self.window_wait_s / steps})
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", pairs_s=f"{record['pairs_per_sec']:.1f}",
                             lr=f"{record['lr']:.2e}")
        self._reset_window()

    @staticmethod
    def record(loop: TrainLoop, step: int, mean_loss: float, pairs_per_sec: float) -> dict[str, Any]:
        """One metrics line: the mean loss over the logging window, lr, temperature, speed.

        Args:
            loop: the training loop (its step, scheduler, loader).
            step: the optimiser step just done.
            mean_loss: mean loss over the window's steps.
            pairs_per_sec: global pairs per second over the window.

        A non-finite loss never gets here: ``TrainStep`` checks every step's loss and gradient
        norm before the optimiser step and raises ``NonFiniteStep``.
        """
        scale = float(loop.train_step.last_logit_scale)
        return {"step": step, "epoch": loop.loader.epoch, "loss": mean_loss,
                "lr": loop.train_step.scheduler.get_last_lr()[0], "temperature": 1.0 / scale,
                "logit_scale": scale, "pairs_per_sec": pairs_per_sec,
                # Bad samples skipped so far, by reason (this rank's counts).
                **{f"data_{k}": v for k, v in loop.loader.error_counts().items()}}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def storage_counters(accelerator: Any, loader: Any, checkpointer: Checkpointer) -> Callable[[], dict[str, int]]:
    """The ``counters`` of ``MetricsObserver`` for a training run: the checkpoint uploads'
    counts (rank 0's) and ``data_retries_all_ranks``, the read retries of every rank summed
    (``data_retries`` is this rank's). Collective: every rank logs at the same steps.

    Args:
        accelerator: the training accelerator.
        loader: the ``ClickPairLoader`` (its ``error_counts()["retries"]``).
        checkpointer: the run's checkpointer (``remote_counts``).
    """
    import torch

    def counts() -> dict[str, int]:
        mine = torch.tensor([loader.error_counts()["retries"]], device=accelerator.device)
        return {**checkpointer.remote_counts(), "data_retries_all_ranks": int(accelerator.reduce(mine, "sum").item())}

    return counts


class SampleKeysObserver:
    """Appends this rank's sample keys of every step to ``sample_keys/rank_R.jsonl``.

    Args:
        output_dir: the run folder.
        rank: this rank.
    """

    name = "sample_keys"

    def __init__(self, output_dir: str | Path, rank: int) -> None:
        self.log = SampleKeysLog(Path(output_dir) / "sample_keys" / f"rank_{rank}.jsonl")

    def on_start(self, loop: TrainLoop, resumed: bool) -> None:
        if not resumed:
            self.log.reset()

    def after_step(self, loop: TrainLoop, report: StepReport) -> None:
        self.log.write(report.step, report.keys, report.epochs)

    def close(self) -> None:
        pass


class EvalObserver:
    """Runs the periodic evaluation when due and logs its record to ``metrics.jsonl``; its
    state (the best score, step and metric so far) goes into every checkpoint.

    Args:
        evaluator: the held-out evaluation (collective).
        metrics: the run's ``metrics.jsonl`` writer.
        tracker: the run's experiment trackers (None: none).
    """

    name = "eval"

    def __init__(self, evaluator: PeriodicEvaluator, metrics: MetricsLog, tracker: Tracker | None = None) -> None:
        self.evaluator, self.metrics, self.tracker = evaluator, metrics, tracker

    def state_dict(self) -> dict[str, Any]:
        """The evaluator's best so far (``PeriodicEvaluator.state_dict``)."""
        return {"best": self.evaluator.state_dict()}

    def on_start(self, loop: TrainLoop, resumed: bool) -> None:
        if not resumed:
            return
        saved = loop.observer_states.get(self.name)
        if saved is None:  # a checkpoint of an earlier version, or of a run without evaluation
            logger.warning("the checkpoint resumed from has no record of the best evaluation: the next "
                           "evaluation replaces %s/best", self.evaluator.out)
            return
        self.evaluator.load_state_dict(saved["best"])

    def after_step(self, loop: TrainLoop, report: StepReport) -> None:
        if self.evaluator.due(report.step):
            record = self.evaluator.run(report.step)
            self.metrics.write(record)
            if self.tracker is not None:
                self.tracker.log_eval(record)

    def close(self) -> None:
        pass


class CheckpointObserver:
    """Saves a checkpoint when one is due or a stop signal arrived; then stops the run.

    With ``checkpoint.async_save`` it also commits a background save once every rank has
    written its part (checked at each step boundary), and a stop waits for the save (and
    rank 0's upload) before the run exits.

    Args:
        checkpointer: saves the full state (the loop's ``state_dict`` included).
        preemption: the installed signal handler (None: no stop requests).

    Raises (from ``after_step``):
        Preempted: after the checkpoint, when a stop signal arrived.
    """

    name = "checkpoint"

    def __init__(self, checkpointer: Checkpointer, preemption: PreemptionHandler | None = None) -> None:
        self.checkpointer, self.preemption = checkpointer, preemption

    def on_start(self, loop: TrainLoop, resumed: bool) -> None:
        pass

    def after_step(self, loop: TrainLoop, report: StepReport) -> None:
        self.checkpointer.poll()  # commits a finished background save (collective)
        stop = self.preemption is not None and self.preemption.requested()
        if stop or self.checkpointer.due(report.step):
            self.checkpointer.save(report.step, loop.state_dict())
        if stop:
            self.checkpointer.finish()  # the save on disk (and uploaded) before the exit
            saved = self.checkpointer.last_saved
            raise Preempted(report.step, str(saved) if saved else None)

    def close(self) -> None:
        # The loop is over: a Python caller of train() gets its own signal handling back.
        if self.preemption is not None:
            self.preemption.uninstall()
