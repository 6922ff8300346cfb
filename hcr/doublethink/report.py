"""What a doublethink run writes: every round as CSV and JSON, the accuracy plot, wandb.

Why all three: the CSV is for a spreadsheet or pandas, the JSON keeps the config next
to the rounds (the run can be re-made from it), the PNG is the per-length
accuracy plot extended over training: a heatmap of accuracy by task length (y) and
examples seen (x) with the curriculum limit drawn on it, and the mean of the last 20
evaluations per length as bars. wandb is optional: offline unless ``WANDB_API_KEY`` is set.
Each file is written atomically (``hcr.files.atomic_path``): the run rewrites them as it
goes, and a kill mid-write must leave the last complete version.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hcr.files import atomic_path, write_atomic

__all__ = ["REPORT_FILES", "RoundRecord", "RunReport", "WandbLogger"]

RECENT_ROUNDS = 20  # rounds averaged in the bar panel (the curriculum's history length by default)
REPORT_FILES = {"csv": "rounds.csv", "json": "report.json", "png": "accuracy_by_length.png"}


@dataclass
class RoundRecord:
    """One round: training on ``batch_lengths`` then an evaluation of lengths ``1 … limit``."""

    round: int
    examples: int  # examples trained on so far
    seconds: float  # wall time since the start
    train_loss: float
    limit: int  # longest length sampled in this round (and evaluated after it)
    mean_task_length: float
    accuracies: list[float]  # per length 1 … limit
    bar: str
    longest_solved: int
    next_limit: int


@dataclass
class RunReport:
    config: dict
    rounds: list[RoundRecord] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def add(self, record: RoundRecord) -> None:
        self.rounds.append(record)

    def accuracy_matrix(self) -> np.ndarray:
        """``[rounds, max limit]`` accuracies, NaN where a length was not evaluated."""
        width = max((r.limit for r in self.rounds), default=0)
        matrix = np.full((len(self.rounds), width), np.nan)
        for i, record in enumerate(self.rounds):
            matrix[i, : record.limit] = record.accuracies
        return matrix

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write the CSV, JSON and PNG into ``out_dir``; returns their paths by kind."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {kind: out_dir / name for kind, name in REPORT_FILES.items()}
        self.write_csv(paths["csv"])
        write_atomic(
            paths["json"],
            json.dumps({"config": self.config, "summary": self.summary, "rounds": [asdict(r) for r in self.rounds]}, indent=1),
        )
        self.plot(paths["png"])
        return paths

    def write_csv(self, path: Path) -> None:
        matrix = self.accuracy_matrix()
        scalars = [name for name in RoundRecord.__dataclass_fields__ if name != "accuracies"]
        with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(scalars + [f"acc_len_{k}" for k in range(1, matrix.shape[1] + 1)])
            for record, row in zip(self.rounds, matrix):
                values = asdict(record)
                writer.writerow([values[name] for name in scalars] + ["" if np.isnan(a) else f"{a:.4f}" for a in row])

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        matrix = self.accuracy_matrix()
        title = ", ".join(f"{k}={self.config[k]}" for k in ("arch", "layers", "task", "answer_weight") if k in self.config)
        fig, (heat, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
        if len(self.rounds):
            examples = np.array([r.examples for r in self.rounds], dtype=float)
            edges = np.concatenate([[0.0], examples])
            lengths = np.arange(matrix.shape[1] + 1) + 0.5
            mesh = heat.pcolormesh(edges, lengths, np.ma.masked_invalid(matrix.T), cmap="viridis", vmin=0, vmax=1)
            limits = np.array([r.limit for r in self.rounds]) + 0.5  # the top edge of the longest length sampled
            heat.step(edges, np.concatenate([limits[:1], limits]), where="pre", color="white", linewidth=1.2,
                      label="curriculum limit")
            fig.colorbar(mesh, ax=heat, label="accuracy (all answer tokens right)")
            heat.legend(loc="upper left", fontsize=8, facecolor="0.3", labelcolor="white")
            recent = matrix[-RECENT_ROUNDS:]
            evaluated = ~np.isnan(recent).all(axis=0)
            means = np.nanmean(recent[:, evaluated], axis=0)
            bars.bar(np.arange(1, matrix.shape[1] + 1)[evaluated], means, color="tab:blue")
        heat.set_xlabel("training examples seen")
        heat.set_ylabel("task length (operations)")
        heat.set_title(f"accuracy by task length over training\n{title}", fontsize=10)
        bars.set_ylim(0, 1)
        bars.set_xlabel("task length")
        bars.set_ylabel("accuracy")
        bars.set_title(f"mean of the last {RECENT_ROUNDS} evaluations", fontsize=10)
        for axis in (heat.yaxis, bars.xaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        with atomic_path(path) as temporary:
            fig.savefig(temporary, dpi=110)
        plt.close(fig)


class WandbLogger:
    """Logs rounds to wandb when ``report_to == "wandb"``: online with ``WANDB_API_KEY``, else offline."""

    def __init__(self, report_to: str, config: dict, out_dir: str | Path, name: str):
        if report_to not in ("none", "wandb"):
            raise ValueError(f"report_to must be 'none' or 'wandb', got {report_to!r}")
        self.run = None
        if report_to == "wandb":
            import wandb

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.run = wandb.init(project="doublethink", name=name, config=config, dir=str(out_dir), mode=mode)

    def log(self, record: RoundRecord) -> None:
        if self.run is None:
            return
        stats = {k: v for k, v in asdict(record).items() if k not in ("accuracies", "bar")}
        stats.update({f"accuracy/len_{k}": a for k, a in enumerate(record.accuracies, start=1)})
        self.run.log(stats, step=record.round)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
