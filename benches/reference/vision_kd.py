"""The PyTorch twin of a vision experiment file: the same teacher and student architectures,
hyperparameters, augmentation and KD loss on the same samples, for the same seeds, written
independently of distillery's code. `experiments/vision.toml` is its subject:

    python3 benches/reference/vision_kd.py experiments/vision.toml --data DIR [--out FILE]

DIR holds the IDX files (`cargo xtask fetch fashion-mnist` puts them in
`~/.cache/distillery/data/fashion-mnist`). It reads the file's settings itself (the subset this
script mirrors: `vision.idx` with `max_train`, `validation_fraction`, `split_seed` and `augment`
crop and flip; a teacher's `dataset` overrides of them; `vision.resnet` and `vision.mlp`;
`baseline` and `kd`; AdamW with a cosine schedule; `eval_every`), so both frameworks run one
configuration. The split is distillery's, computed by a port of its generator
(`tests/fixtures/distill_rng.py`), so both train on the same images. Initialisation, shuffling and augmentation draw from PyTorch's generator seeded
with the run's seed: the same distributions, other draws.

Prints one JSON line per run and the summary (mean +- std over seeds, kd - baseline paired by
seed with its t statistic), and writes them to --out as JSON.
"""
import argparse
import gzip
import json
import math
import os
import statistics
import struct
import sys
import time
import tomllib

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "tests", "fixtures"))
from distill_rng import Rng, check as check_port  # noqa: E402  (the split's generator)
from steps import ALPHA, T, kd_loss  # noqa: E402  (the bench's KD loss and distillery's defaults)


# --- data -----------------------------------------------------------------------------------------

def read_idx(folder, prefix):
    def open_any(name):
        path = os.path.join(folder, name)
        return gzip.open(path + ".gz") if os.path.exists(path + ".gz") else open(path, "rb")

    with open_any(f"{prefix}-images-idx3-ubyte") as f:
        _, n, h, w = struct.unpack(">IIII", f.read(16))
        images = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).reshape(n, 1, h, w)
    with open_any(f"{prefix}-labels-idx1-ubyte") as f:
        f.read(8)
        labels = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
    return images, labels


def splits(cfg, folder):
    """distillery's `carve`: validation from a seeded shuffle of the training source, then the
    first `max_train` of the rest; the test files as the test split."""
    images, labels = read_idx(folder, cfg.get("train", "train"))
    test = read_idx(folder, cfg.get("test", "t10k"))
    order = list(range(len(labels)))
    Rng.derive(cfg.get("split_seed", 0), "split").shuffle(order)
    n_val = round(len(order) * cfg.get("validation_fraction", 0.1))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if cfg.get("max_train") is not None:
        train_idx = train_idx[: cfg["max_train"]]
    pick = lambda idx: (images[idx], labels[idx])
    return pick(torch.tensor(train_idx)), pick(torch.tensor(val_idx)), test


class Data:
    """Splits normalised with the training split's per-channel statistics."""

    def __init__(self, cfg, folder):
        (tx, ty), (vx, vy), (sx, sy) = splits(cfg, folder)
        raw = tx.double() / 255.0
        self.mean = raw.mean(dim=(0, 2, 3), keepdim=True)
        self.std = raw.std(dim=(0, 2, 3), keepdim=True, unbiased=False).clamp(min=1e-6)
        norm = lambda x: ((x.double() / 255.0 - self.mean) / self.std).float()
        self.train, self.val, self.test = (norm(tx), ty), (norm(vx), vy), (norm(sx), sy)
        aug = cfg.get("augment", {})
        self.padding, self.flip = aug.get("crop_padding", 0), aug.get("flip", False)
        if aug.get("mixup", 0) or aug.get("cutmix", 0):
            sys.exit("this twin mirrors crop and flip only")
        # The value a black (0) pixel normalises to: what padding adds.
        self.black = ((0.0 - self.mean) / self.std).float()

    def augment(self, x, gen):
        """Random crop from the zero-padded image and a horizontal flip, per sample."""
        if self.padding:
            p = self.padding
            padded = self.black.expand(x.shape[0], -1, x.shape[2] + 2 * p, x.shape[3] + 2 * p).clone()
            padded[:, :, p:-p, p:-p] = x
            dy = torch.randint(0, 2 * p + 1, (x.shape[0],), generator=gen)
            dx = torch.randint(0, 2 * p + 1, (x.shape[0],), generator=gen)
            h, w = x.shape[2], x.shape[3]
            x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(x.shape[0])])
        if self.flip:
            mirror = torch.rand(x.shape[0], generator=gen) < 0.5
            x = torch.where(mirror[:, None, None, None], x.flip(3), x)
        return x


# --- models ---------------------------------------------------------------------------------------

def groups_for(channels, groups):
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


class Block(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.norm1 = nn.GroupNorm(groups_for(cout, groups), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.norm2 = nn.GroupNorm(groups_for(cout, groups), cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0),
                                          nn.GroupNorm(groups_for(cout, groups), cout))

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """`vision.resnet`: a 3x3 stem, three stages (width, 2x, 4x; stride 2 from the second) of
    basic blocks with group norm, global average pooling, a linear head."""

    def __init__(self, channels, classes, width=16, blocks=1, groups=8, stem_stride=1):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, stem_stride, 1)
        self.stem_norm = nn.GroupNorm(groups_for(width, groups), width)
        layers, cin = [], width
        for stage in range(3):
            cout = width << stage
            for b in range(blocks):
                layers.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1, groups))
                cin = cout
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem_norm(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


class Mlp(nn.Module):
    """`vision.mlp`: ReLU hidden layers on the flattened image and a linear head."""

    def __init__(self, inputs, classes, hidden=(256, 256)):
        super().__init__()
        widths = [inputs, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


def build(entry, data):
    channels, h, w = data.train[0].shape[1:]
    cfg = entry.get("config", {})
    if entry["model"] == "vision.resnet":
        return ResNet(channels, 10, **cfg)
    if entry["model"] == "vision.mlp":
        return Mlp(channels * h * w, 10, **cfg)
    sys.exit(f"this twin has no {entry['model']}")


# --- training -------------------------------------------------------------------------------------

def accuracy(model, split, batch=500):
    model.eval()
    x, y = split
    with torch.no_grad():
        hits = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
                   for i in range(0, len(y), batch))
    return hits / len(y)


def fit(model, data, train, seed, strategy=None, teacher=None):
    """AdamW with a cosine schedule per optimizer step; the metric of the best validation epoch
    (the first best among those evaluated, every `eval_every` and the last) and of the last one."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = train["optimizer"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt["lr"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=opt.get("weight_decay", 0.0))
    x, y = data.train
    steps_per_epoch = math.ceil(len(y) / train["batch_size"])
    total, step = steps_per_epoch * train["epochs"], 0
    best = (-1.0, None, None)
    for epoch in range(train["epochs"]):
        order = torch.randperm(len(y), generator=gen)
        model.train()
        for i in range(0, len(y), train["batch_size"]):
            idx = order[i:i + train["batch_size"]]
            xb, yb = data.augment(x[idx], gen), y[idx]
            for g in optimizer.param_groups:
                g["lr"] = 0.5 * opt["lr"] * (1 + math.cos(math.pi * step / total))
            logits = model(xb)
            if strategy and strategy["name"] == "kd":
                with torch.no_grad():
                    t = teacher(xb)  # live, in evaluation mode: the student's augmented view
                c = strategy.get("config", {})
                loss = kd_loss(logits, t, yb, c.get("alpha", ALPHA), c.get("temperature", T))
            else:
                loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        if (epoch + 1) % train.get("eval_every", 1) and epoch + 1 != train["epochs"]:
            continue  # distillery's `eval_every`: not evaluated
        val = accuracy(model, data.val)
        test = accuracy(model, data.test)
        if val > best[0]:
            best = (val, test, epoch)
        model.train()
    return {"best_metric": best[1], "best_epoch": best[2], "final_metric": test}


def merged(base, entry):
    out = dict(base)
    out.update(entry.get("train", {}))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("experiment")
    ap.add_argument("--data", required=True, help="folder of the IDX files")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out")
    args = ap.parse_args()
    check_port()
    torch.set_num_threads(args.threads)
    with open(args.experiment, "rb") as f:
        exp = tomllib.load(f)
    dataset = exp["datasets"][0]["config"]
    data = Data(dataset, args.data)
    teacher_entry, student_entry = exp["teachers"][0], exp["students"][0]
    # The teacher trains on its own view of the dataset (for example more labelled images) and
    # teaches live on the students' batches, as in distillery.
    teacher_data = Data({**dataset, **teacher_entry.get("dataset", {})}, args.data)
    seeds = exp["seeds"]
    runs = []
    started = time.time()
    teacher_seed = exp.get("teacher_seed", 0)
    teacher = build(teacher_entry, teacher_data)
    t0 = time.time()
    result = fit(teacher, teacher_data, merged(exp["train"], teacher_entry), teacher_seed)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_run = {"role": "teacher", "seed": teacher_seed, **result,
                   "wall_seconds": time.time() - t0,
                   "parameters": sum(p.numel() for p in teacher.parameters())}
    print(json.dumps(teacher_run), flush=True)
    for seed in seeds:
        for strategy in exp["strategies"]:
            student = build(student_entry, data)
            t0 = time.time()
            result = fit(student, data, merged(exp["train"], student_entry), seed, strategy, teacher)
            run = {"role": "student", "strategy": strategy["name"], "seed": seed, **result,
                   "wall_seconds": time.time() - t0,
                   "parameters": sum(p.numel() for p in student.parameters())}
            runs.append(run)
            print(json.dumps(run), flush=True)
    summary = {}
    for name in {r["strategy"] for r in runs}:
        values = [r["best_metric"] for r in runs if r["strategy"] == name]
        summary[name] = {"mean": statistics.mean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "n": len(values)}
    base = {r["seed"]: r["best_metric"] for r in runs if r["strategy"] == "baseline"}
    diffs = [r["best_metric"] - base[r["seed"]] for r in runs
             if r["strategy"] == "kd" and r["seed"] in base]
    if len(diffs) > 1:
        mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
        summary["kd - baseline"] = {"mean": mean, "std": sd, "n": len(diffs),
                                    "t": mean / (sd / math.sqrt(len(diffs))) if sd > 0 else None}
    out = {"experiment": args.experiment, "torch": torch.__version__, "threads": args.threads,
           "teacher": teacher_run, "runs": runs, "summary": summary,
           "wall_seconds": time.time() - started}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
