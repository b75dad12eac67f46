"""TensorBoard logging of a tracked run: scalars per step, LCA histograms from the
fused op's bin counts (``add_histogram_raw``: no per-parameter data goes to the
host), and the report's figures as images."""
from __future__ import annotations

from typing import Optional

import numpy as np


class TensorBoardLogger:
    """``logger = TensorBoardLogger(logdir, tracker)``; after each tracked step
    ``logger.log_step(tracker.last)``; ``logger.close()`` at the end."""

    def __init__(self, logdir: str, tracker):
        from ._extras import require

        require("TensorBoard logging", ["tensorboard"])
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(logdir)
        self.tracker = tracker
        self.layer_names = tracker.params.layer_names
        self.layer_of = np.asarray(tracker.params.layer_of)
        edges = tracker.bin_edges.cpu().numpy()
        # bucket limits for [under, bins..., over]: each bucket's right edge
        self.limits = np.concatenate([edges, [np.finfo(np.float64).max]])

    def log_step(self, record: Optional[dict]) -> None:
        if record is None:
            return
        step = int(record["step"])
        w = self.writer
        for obj in [o.name for o in self.tracker.objectives]:
            p = obj + "/"
            w.add_scalar(f"{obj}/loss", record[p + "loss_after"], step)
            w.add_scalar(f"{obj}/lca_sum", record[p + "lca_sum"], step)
            w.add_scalar(f"{obj}/grounding_error", record[p + "error"], step)
            w.add_scalar(f"{obj}/splits", record[p + "splits"], step)
        counts = record["train/counts"]                     # [K, 4]
        w.add_scalar("train/helped_fraction", counts[:, 0].sum() / max(counts.sum(), 1), step)
        for i, name in enumerate(self.layer_names):
            c = counts[self.layer_of == i]
            w.add_scalar(f"helped_fraction/{name}", c[:, 0].sum() / max(c.sum(), 1), step)
            w.add_scalar(f"lca/{name}", record["train/tensor_sums"][self.layer_of == i].sum(),
                         step)
        hist = record["train/histogram"].sum(0)            # [B + 2]
        n = int(hist.sum())
        if n:
            total = float(record["train/lca_sum"])
            edges = self.tracker.bin_edges.cpu().numpy()
            centres = np.concatenate([[edges[0]], (edges[:-1] + edges[1:]) / 2, [edges[-1]]])
            w.add_histogram_raw("train/lca_values", min=float(edges[0]), max=float(edges[-1]),
                                num=n, sum=total,
                                sum_squares=float((hist * centres ** 2).sum()),
                                bucket_limits=self.limits.tolist(),
                                bucket_counts=hist.astype(np.float64).tolist(),
                                global_step=step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def add_figures(logdir: str, report_html: str, step: int = 0) -> None:
    """The report's PNG figures (beside ``report_html``) as TensorBoard images."""
    import glob
    import os

    from ._extras import require

    require("TensorBoard figures", ["tensorboard", "PIL"])
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(logdir)
    for path in sorted(glob.glob(os.path.join(os.path.dirname(report_html), "*.png"))):
        img = np.asarray(Image.open(path).convert("RGB"))
        writer.add_image("figures/" + os.path.basename(path)[:-4], img, step,
                         dataformats="HWC")
    writer.close()
