"""TensorBoard logging of a tracked run: scalars per step, LCA histograms from the
fused op's bin counts (``add_histogram_raw``: no per-parameter data goes to the
host), per-step images of the frame tensors' per-element LCA (TensorBoard's step
slider scrubs through training), and the report's figures as images."""
from __future__ import annotations

from typing import Optional

import numpy as np


def lca_image(values: np.ndarray, limit: Optional[float] = None, percentile: float = 99.0,
              max_side: int = 1024) -> np.ndarray:
    """Per-element LCA as a uint8 RGB image [H, W, 3]: green = helps (negative),
    red = hurts (positive), black = 0, on a symmetric scale ± ``limit`` (default:
    the ``percentile`` of the nonzero |LCA|; beyond it saturates).  A 1-D tensor
    is one row; more dimensions are [dim 0, the rest]; a side over ``max_side``
    is shrunk by summing neighbouring elements."""
    a = image_cells(values, max_side)
    if limit is None:
        limit = _limit(a, percentile)
    if not limit > 0:
        raise ValueError(f"lca_ext.lca_image: limit must be > 0, got {limit}")
    v = np.clip(np.nan_to_num(a / limit), -1.0, 1.0)
    rgb = np.stack([np.clip(v, 0, 1), np.clip(-v, 0, 1), np.zeros_like(v)], -1)
    return (255 * rgb).round().astype(np.uint8)


def image_cells(values: np.ndarray, max_side: int = 1024) -> np.ndarray:
    """The 2-D array an image shows: [dim 0, the rest], sides over ``max_side``
    shrunk by summing neighbouring elements (LCA is additive)."""
    a = np.asarray(values, dtype=np.float64)
    a = a.reshape(1, -1) if a.ndim < 2 else a.reshape(a.shape[0], -1)
    return _shrink(_shrink(a, max_side, 0), max_side, 1)


def _limit(a: np.ndarray, percentile: float = 99.0) -> float:
    nz = np.abs(a[np.isfinite(a) & (a != 0)])
    return float(np.percentile(nz, percentile)) if nz.size else 1.0


def _shrink(a: np.ndarray, max_side: int, axis: int) -> np.ndarray:
    per = -(-a.shape[axis] // max_side)
    if per <= 1:
        return a
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, per * (-(-a.shape[axis] // per)) - a.shape[axis])
    a = np.pad(a, pad)
    if axis == 0:
        return a.reshape(-1, per, a.shape[1]).sum(1)
    return a.reshape(a.shape[0], -1, per).sum(2)


class TensorBoardLogger:
    """``logger = TensorBoardLogger(logdir, tracker)``; after each tracked step
    ``logger.log_step(tracker.last)``; ``logger.close()`` at the end.

    Besides scalars and histograms, a step that stored frames (the tracker's
    ``frames=`` tensors, every ``frame_every`` tracked steps) logs each frame
    tensor's per-element LCA as an image "frames/<tensor>" (``lca_image``, its
    own symmetric scale, logged as the scalar "frames/<tensor>/limit")."""

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
            for flag in ("grounded", "noise_limited", "budget_limited"):   # 0/1 per step
                if p + flag in record:
                    w.add_scalar(f"{obj}/{flag}", float(bool(record[p + flag])), step)
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
        self._log_frames(record, step)

    def _log_frames(self, record: dict, step: int) -> None:
        # the tracker keeps the frames of its last step beside its last record
        if record is not getattr(self.tracker, "last", None):
            return
        frames = getattr(self.tracker, "last_frames", None) or {}
        for key, values in frames.items():
            name = self.tracker.params.names[int(key)]
            cells = image_cells(values)      # the scale of what is drawn (sums
            limit = _limit(cells)              # of neighbours in a big tensor)
            self.writer.add_image(f"frames/{name}", lca_image(cells, limit), step,
                                  dataformats="HWC")
            self.writer.add_scalar(f"frames/{name}/limit", limit, step)

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
