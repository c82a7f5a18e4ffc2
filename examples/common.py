"""Small helpers the paper-reproduction examples share: offline-first data loading, schedules, result files.

Kept deliberately small; each example script still reads top to bottom on its own.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import socket

import numpy as np
import torch

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Hugging Face Hub copies of the data sets (used only when online and no --data-dir is given)
HUB_IMAGE_DATASETS = {
    "fashion-mnist": ("zalando-datasets/fashion_mnist", None, "image", "label"),
    "mnist": ("ylecun/mnist", None, "image", "label"),
    "cifar10": ("uoft-cs/cifar10", None, "img", "label"),
    "cifar100": ("uoft-cs/cifar100", None, "img", "fine_label"),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits", "image", "label"),
}


def hub_online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Fail fast offline: no multi-minute retries inside `datasets` when the machine has no network."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or os.environ.get(
        "HF_DATASETS_OFFLINE"
    ):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


_METRICS: dict[str, object] = {}


def accuracy_score(predictions, references) -> float:
    """Accuracy through `evaluate`'s metric where it can be loaded, else the same formula here.

    `evaluate.load` fetches each metric's script from the Hugging Face Hub, so offline (and on this project's
    machines) it cannot load; the fallback computes mean(predictions == references), which is what that script
    computes, and says so once.
    """
    predictions, references = np.asarray(predictions).ravel(), np.asarray(references).ravel()
    if "accuracy" not in _METRICS:
        _METRICS["accuracy"] = None
        if hub_online():
            try:
                import evaluate

                _METRICS["accuracy"] = evaluate.load("accuracy")
            except Exception as e:  # evaluate missing, Hub unreachable, metric script unavailable
                print(f"note: evaluate's 'accuracy' could not be loaded ({type(e).__name__}); computing it directly")
        else:
            print("note: offline, so evaluate's 'accuracy' (a script on the Hub) is computed directly, same formula")
    metric = _METRICS["accuracy"]
    if metric is None:
        return float((predictions == references).mean())
    return float(metric.compute(predictions=predictions, references=references)["accuracy"])


def read_idx(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-format gzipped IDX files (Fashion-MNIST and MNIST ship in this format)."""
    img_name, lbl_name = IDX_FILES[split]
    images = np.frombuffer(gzip.open(os.path.join(data_dir, img_name)).read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(os.path.join(data_dir, lbl_name)).read(), np.uint8, offset=8)
    return images.reshape(-1, 28, 28), labels.astype(np.int64)


def write_idx(data_dir: str, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Inverse of `read_idx` (used by the tests to build a tiny fake data set)."""
    os.makedirs(data_dir, exist_ok=True)
    img_name, lbl_name = IDX_FILES[split]
    n, h, w = images.shape
    header = np.array([2051, n, h, w], dtype=">i4").tobytes()
    with gzip.open(os.path.join(data_dir, img_name), "wb") as f:
        f.write(header + images.astype(np.uint8).tobytes())
    with gzip.open(os.path.join(data_dir, lbl_name), "wb") as f:
        f.write(np.array([2049, n], dtype=">i4").tobytes() + labels.astype(np.uint8).tobytes())


def load_images(name: str, data_dir: str | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'train': (x, y), 'test': (x, y)} with x float in [0, 1] of shape (n, C, H, W).

    `data_dir`: gzipped IDX files (Fashion-MNIST, MNIST) or a `datasets.save_to_disk` folder (any data set).
    Without it the Hugging Face Hub copy is downloaded when the machine is online.
    """
    if name == "digits":  # scikit-learn's bundled 8x8 digits: always offline
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(d.target, dtype=torch.long)
        idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target)
        return {"train": (x[idx_tr], y[idx_tr]), "test": (x[idx_te], y[idx_te])}
    if data_dir is not None and os.path.exists(os.path.join(data_dir, IDX_FILES["train"][0])):
        out = {}
        for split in ("train", "test"):
            images, labels = read_idx(data_dir, split)
            out[split] = (torch.tensor(images, dtype=torch.float32).div_(255).unsqueeze(1), torch.tensor(labels))
        return out
    import datasets

    if data_dir is not None:
        ds = datasets.load_from_disk(data_dir)
    elif not hub_online():
        raise SystemExit(
            f"Cannot download '{name}': no network (or HF_HUB_OFFLINE is set). Pass --data-dir with the gzipped "
            "IDX files (Fashion-MNIST/MNIST, e.g. $DATA/fashion-mnist, README 'Set-up') or a datasets.save_to_disk "
            "folder."
        )
    else:
        repo, cfg, _, _ = HUB_IMAGE_DATASETS[name]
        ds = datasets.load_dataset(repo, cfg)
    _, _, img_col, lbl_col = HUB_IMAGE_DATASETS.get(name, (None, None, "image", "label"))
    out = {}
    for split in ("train", "test"):
        arr = np.stack([np.asarray(im) for im in ds[split][img_col]])
        arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
        out[split] = (torch.tensor(arr, dtype=torch.float32).div_(255), torch.tensor(ds[split][lbl_col]))
    return out


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of n examples (all when n is None or larger)."""
    if n is None or n >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def cosine_lr(step: int, total: int, lr0: float) -> float:
    """Cosine decay from lr0 to 0 over `total` steps (the paper's schedule everywhere)."""
    return 0.5 * lr0 * (1 + math.cos(math.pi * min(step, total) / total))


def lam_grid(lo: float, hi: float, n: int) -> list[float]:
    return np.logspace(np.log10(lo), np.log10(hi), n).tolist() if n > 1 else [hi]


def write_results(output_dir: str, name: str, rows: list[dict], meta: dict | None = None) -> None:
    """`<name>.csv` (one row per run) and `<name>.json` ({'meta': ..., 'rows': ...})."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta or {}, "rows": rows}, f, indent=2)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(output_dir, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict], keys: list[str]) -> str:
    """A results table to paste into docs (floats to 4 significant digits)."""

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib with the file-only Agg backend (no display on servers or in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lam_axis(ax, lams=None, label: str = "lam") -> None:
    """A log lam axis whose labels do not collide. Over two decades or more: decade labels only (minor ticks
    unlabelled). Over a narrower range (a --quick run): the lam values themselves, at most 8, slanted."""
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator

    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.xaxis.set_minor_formatter(NullFormatter())
    values = sorted({float(v) for v in lams or [] if v > 0})
    if values and values[-1] / values[0] < 100:
        shown = values[:: max(1, -(-len(values) // 8))]
        ax.xaxis.set_major_locator(FixedLocator(shown))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{v:.2g}" for v in shown], rotation=30, ha="right")
    else:
        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=8))


def count_axis(ax) -> None:
    """A log-like count axis that still shows 0 (a plain log axis drops lines that reach zero off the plot)."""
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
