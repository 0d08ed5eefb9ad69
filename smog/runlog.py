"""Run directory outputs: metrics as JSON lines and PNG plots (loss, kNN accuracy, group usage)."""
from __future__ import annotations

import json
import math
import os

import torch


def usage(counts: torch.Tensor) -> tuple[int, float]:
    """counts [K] -> (non-empty groups, assignment entropy normalised to [0, 1] by log K)."""
    counts = counts.double()
    nonempty = int((counts > 0).sum())
    p = counts / counts.sum().clamp(min=1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return nonempty, entropy / math.log(counts.numel()) if counts.numel() > 1 else 0.0


class RunLog:
    """Appends JSON records to metrics.jsonl and redraws the plots from it."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.run_dir = run_dir

    def write(self, record: dict) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path) as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def restart(self) -> None:
        """Start an empty log (a fresh run in a directory that holds an earlier run's records)."""
        open(self.path, "w").close()

    def truncate_after(self, step: int) -> None:
        """Drop records newer than `step` (after a resume from an earlier checkpoint)."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        with open(self.path, "w") as out:
            out.writelines(json.dumps(r) + "\n" for r in kept)

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r for r in self.records() if r.get("kind") == "epoch"]
        if not epochs:
            return
        x = [r["epoch"] for r in epochs]
        fig, ax = plt.subplots()
        ax.plot(x, [r["loss"] for r in epochs], marker="o")
        ax.set(xlabel="epoch", ylabel="SMoG loss", title="training loss")
        fig.savefig(os.path.join(self.run_dir, "loss.png"), dpi=100)
        plt.close(fig)
        knn = [r for r in epochs if "knn" in r]
        if knn:
            fig, ax = plt.subplots()
            for key in knn[-1]["knn"]:
                ax.plot([r["epoch"] for r in knn], [r["knn"][key] for r in knn], marker="o", label=key)
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
