"""Run directory outputs: metrics as JSON lines, TensorBoard event files, PNG plots (loss, kNN accuracy,
group usage) and, opted in, a Weights & Biases run."""
from __future__ import annotations

import glob
import json
import os


from smog.config import ConfigError


def scalars(record: dict) -> dict[str, float]:
    """A record's numbers as {"kind/name": value}; lists (one entry per head) as "kind/name/h"."""
    kind, out = record.get("kind", "record"), {}
    for key, value in record.items():
        if key in ("kind", "step"):
            continue
        if isinstance(value, dict):
            out.update({f"{kind}/{key}/{k}": float(v) for k, v in value.items()})
        elif isinstance(value, (list, tuple)):
            out.update({f"{kind}/{key}/{h}": float(v) for h, v in enumerate(value)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{kind}/{key}"] = float(value)
    return out


def wandb_module():
    """The wandb package, or a ConfigError saying how to get it (train.wandb=true needs it)."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb=true needs the wandb package: pip install wandb "
                          "(or set train.wandb=false)") from None
    return wandb


class RunLog:
    """Appends JSON records to metrics.jsonl, mirrors their numbers to TensorBoard (when `tensorboard`
    and the package are there) and to Weights & Biases (when `wandb` is a dict of wandb.init arguments),
    and redraws the plots from metrics.jsonl. Writers open on the first record (rank 0 only writes)."""

    def __init__(self, run_dir: str, tensorboard: bool = False, wandb: dict | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.run_dir = run_dir
        self.tensorboard, self.wandb_args = tensorboard, wandb
        self.board, self.wandb, self.purge_step = None, None, None
        if wandb is not None:
            wandb_module()  # a missing package fails before any training

    def write(self, record: dict) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps(record) + "\n")
        numbers, step = scalars(record), int(record.get("step", 0))
        if self.tensorboard and (board := self._board()) is not None:
            for tag, value in numbers.items():
                board.add_scalar(tag, value, step)
            board.flush()
        if self.wandb_args is not None:
            if self.wandb is None:
                self.wandb = wandb_module().init(dir=self.run_dir, **self.wandb_args)
            self.wandb.log(numbers, step=step)

    def _board(self):
        """The TensorBoard writer (None when the tensorboard package is not installed)."""
        if self.board is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.tensorboard = False
                return None
            self.board = SummaryWriter(self.run_dir, purge_step=self.purge_step)
        return self.board

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.wandb is not None:
            self.wandb.finish()

    def records(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path) as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def restart(self) -> None:
        """Start an empty log (a fresh run in a directory that holds an earlier run's records)."""
        open(self.path, "w").close()
        for events in glob.glob(os.path.join(self.run_dir, "events.out.tfevents.*")):
            os.remove(events)

    def truncate_after(self, step: int) -> None:
        """Drop records newer than `step` (after a resume from an earlier checkpoint; a run directory that has no
        log yet, resuming a checkpoint from elsewhere, is left as it is)."""
        if os.path.isfile(self.path):
            kept = [r for r in self.records() if r.get("step", 0) <= step]
            with open(self.path, "w") as out:
                out.writelines(json.dumps(r) + "\n" for r in kept)
        self.purge_step = step + 1  # TensorBoard hides the dropped steps' events too

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r for r in self.records() if r.get("kind") == "epoch"]
        if not epochs:
            return
        x = [r["epoch"] + 1 for r in epochs]  # records count epochs from 0, the log and `smog eval` from 1
        fig, ax = plt.subplots()
        ax.plot(x, [r["loss"] for r in epochs], marker="o")
        ax.set(xlabel="epoch", ylabel="SMoG loss", title="training loss")
        fig.savefig(os.path.join(self.run_dir, "loss.png"), dpi=100)
        plt.close(fig)
        knn = [r for r in epochs if "knn" in r]
        if knn:
            fig, ax = plt.subplots()
            for key in knn[-1]["knn"]:
                ax.plot([r["epoch"] + 1 for r in knn], [r["knn"][key] for r in knn], marker="o", label=key)
            ax.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="kNN accuracy")
            ax.legend()
            fig.savefig(os.path.join(self.run_dir, "knn.png"), dpi=100)
            plt.close(fig)
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for h in range(len(epochs[-1]["nonempty"])):
            left.plot(x, [r["nonempty"][h] for r in epochs], marker="o", label=f"head {h}")
            right.plot(x, [r["entropy"][h] for r in epochs], marker="o", label=f"head {h}")
        left.set(xlabel="epoch", ylabel="non-empty groups", title="groups in use")
        right.set(xlabel="epoch", ylabel="entropy / log K", title="assignment entropy")
        left.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(self.run_dir, "groups.png"), dpi=100)
        plt.close(fig)
