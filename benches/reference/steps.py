"""The PyTorch reference of `tests/src/steps.rs`: the same training steps (student forward, loss,
backward, AdamW update) on the same shapes, for `cargo xtask bench --compare`.

    python3 benches/reference/steps.py <step> [--seconds S] [--threads N]
    python3 benches/reference/steps.py minilm-<...> --batch FILE --weights FILE [...]
    python3 benches/reference/steps.py --list

Prints one JSON line like `bench-step`: steps per second, steps and seconds timed, peak resident
memory (ru_maxrss) and the last loss. The models mirror ours layer for layer (PyTorch's own
modules where one exists: nn.LSTM, nn.TransformerEncoderLayer, nn.GroupNorm); NeuMF's first
MLP layer is split into its user and item halves as ours is (the same arithmetic). Inputs are
random with the same shapes, vocabulary and label counts, except the MiniLM steps': the real SST-2
batch `bench-step <step> --write-batch FILE` wrote (`--batch`) and the pretrained weights
(`--weights`, all-MiniLM-L6-v2's model.safetensors), as `cargo xtask bench` passes them.
"""
import argparse
import json
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ALPHA, T = 0.1, 4.0


def kd_loss(s, t, y, alpha=ALPHA, temperature=T):
    """Hinton's loss as distillery's `kd`: alpha CE + (1 - alpha) T^2 KL(teacher || student)."""
    ce = F.cross_entropy(s, y)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  log_target=True, reduction="batchmean")
    return alpha * ce + (1 - alpha) * temperature * temperature * kl


def ranking_kd_loss(s, t, rel):
    """Pointwise: BCE and binary KL of sigmoid(t/T), sigmoid(s/T), over the labelled candidates
    (picked first, as distillery does: a positive and four negatives among 2,000 scores)."""
    m = rel >= 0
    s, t, rel = s[m], t[m], rel[m]
    bce = F.binary_cross_entropy_with_logits(s, rel.clamp(min=0))
    st, tt = s / T, t / T
    lp, lq = F.logsigmoid(tt), F.logsigmoid(-tt)
    kl = lp.exp() * (lp - F.logsigmoid(st)) + lq.exp() * (lq - F.logsigmoid(-st))
    return ALPHA * bce + (1 - ALPHA) * T * T * kl.mean()


class MLP(nn.Module):
    def __init__(self, hidden, inputs=784, classes=10):
        super().__init__()
        widths = [inputs] + hidden
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.head(x)


class LeNet(nn.Module):
    def __init__(self, channels=(6, 16), hidden=(120, 84), classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels[0], 5, padding=2)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 5)
        self.fc1 = nn.Linear(channels[1] * 5 * 5, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.head = nn.Linear(hidden[1], classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.head(F.relu(self.fc2(x)))


def conv_norm(cin, cout, k, stride, groups, norm_groups, padding):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups),
                         nn.GroupNorm(norm_groups, cout))


class MobileNet(nn.Module):
    def __init__(self, stem=16, channels=(32, 64, 128), groups=8, classes=10):
        super().__init__()
        self.stem = conv_norm(1, stem, 3, 1, 1, groups, 1)
        blocks, width = [], stem
        for i, out in enumerate(channels):
            stride = 1 if i == 0 else 2
            blocks.append(nn.ModuleList([conv_norm(width, width, 3, stride, width, groups, 1),
                                         conv_norm(width, out, 1, 1, 1, groups, 0)]))
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for dw, pw in self.blocks:
            x = F.relu(pw(F.relu(dw(x))))
        return self.head(x.mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        self.a = conv_norm(cin, cout, 3, stride, 1, groups, 1)
        self.b = conv_norm(cout, cout, 3, 1, 1, groups, 1)
        self.shortcut = (conv_norm(cin, cout, 1, stride, 1, groups, 0)
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.b(F.relu(self.a(x))) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, width=16, blocks=1, groups=8, classes=10):
        super().__init__()
        self.stem = conv_norm(1, width, 3, 1, 1, groups, 1)
        layers, cin = [], width
        for stage in range(3):
            cout = width * 2 ** stage
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1, groups))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.layers(F.relu(self.stem(x))).mean((2, 3)))


class Bert(nn.Module):
    """BERT with post-norm layers (as ours and Hugging Face's), mean pooling, linear head."""

    def __init__(self, vocab=5000, d=128, layers=2, heads=4, ff=256, positions=512, classes=2):
        super().__init__()
        self.words = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(positions, d)
        self.segments = nn.Embedding(2, d)
        self.norm = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation="gelu",
                                       layer_norm_eps=1e-12, batch_first=True)
            for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, ids, mask):
        t = ids.shape[1]
        x = self.words(ids) + self.positions.weight[:t] + self.segments.weight[0]
        x = self.norm(x)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(2)
        return self.head((x * m).sum(1) / m.sum(1).clamp(min=1e-9))


def minilm(weights):
    """all-MiniLM-L6-v2 as `Bert` (no dropout, as ours), its encoder loaded from `weights`."""
    from safetensors.torch import load_file
    model = Bert(vocab=30522, d=384, layers=6, heads=12, ff=1536)
    theirs = load_file(weights)
    with torch.no_grad():
        # `our_names` gives views of the parameters (the fused attention projections by rows).
        for name, value in our_names(model).items():
            if not name.startswith("classifier."):
                value.copy_(theirs[name])
    return model


class ZooResNet(nn.Module):
    """RepDistiller's CIFAR ResNet (`resnet20` for depth 20): 3x3 stem, three stages of basic
    blocks with batch norm and 1x1 projection shortcuts, global average pooling, `fc`."""

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                             nn.BatchNorm2d(cout))
                               if stride != 1 or cin != cout else None)

        def forward(self, x):
            h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(h + (x if self.downsample is None else self.downsample(x)))

    def __init__(self, depth=20, widths=(16, 16, 32, 64), channels=3, classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for stage, width in enumerate(widths[1:]):
            blocks = []
            for b in range(n):
                blocks.append(self.Block(cin, width, 2 if stage > 0 and b == 0 else 1))
                cin = width
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


class BiLSTM(nn.Module):
    def __init__(self, vocab=5000, embedding=128, hidden=150, mlp=200, classes=2):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True, bidirectional=True)
        self.mlp = nn.Linear(2 * hidden, mlp)
        self.head = nn.Linear(mlp, classes)

    def forward(self, ids, mask):
        _, (h, _) = self.lstm(self.embedding(ids))
        return self.head(F.relu(self.mlp(torch.cat([h[0], h[1]], 1))))


class TextCNN(nn.Module):
    def __init__(self, vocab=5000, embedding=128, widths=(3, 4, 5), filters=100, classes=2):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding)
        self.convs = nn.ModuleList(nn.Conv1d(embedding, filters, k) for k in widths)
        self.head = nn.Linear(filters * len(widths), classes)

    def forward(self, ids, mask):
        x = (self.embedding(ids) * mask.unsqueeze(2)).transpose(1, 2)
        return self.head(torch.cat([F.relu(c(x)).amax(2) for c in self.convs], 1))


class MF(nn.Module):
    def __init__(self, users, items, dim):
        super().__init__()
        self.user, self.item = nn.Embedding(users, dim), nn.Embedding(items, dim)
        self.bias = nn.Embedding(items, 1)
        for e in (self.user, self.item):
            nn.init.normal_(e.weight, std=0.1)
        nn.init.zeros_(self.bias.weight)

    def forward(self, u):
        return self.user(u) @ self.item.weight.T + self.bias.weight.T


class NeuMF(nn.Module):
    def __init__(self, users, items, dim=16, layers=(32, 16)):
        super().__init__()
        self.gmf_user, self.gmf_item = nn.Embedding(users, dim), nn.Embedding(items, dim)
        self.mlp_user, self.mlp_item = nn.Embedding(users, dim), nn.Embedding(items, dim)
        for e in (self.gmf_user, self.gmf_item, self.mlp_user, self.mlp_item):
            nn.init.normal_(e.weight, std=0.01)
        self.first = nn.Linear(2 * dim, layers[0])
        self.rest = nn.ModuleList(nn.Linear(a, b) for a, b in zip(layers, layers[1:]))
        self.out = nn.Linear(dim + layers[-1], 1)
        self.dim = dim

    def forward(self, u):
        p, q = self.gmf_user(u), self.gmf_item.weight
        w_user, w_item = self.first.weight[:, :self.dim], self.first.weight[:, self.dim:]
        h = F.relu((self.mlp_user(u) @ w_user.T).unsqueeze(1)
                   + (self.mlp_item.weight @ w_item.T + self.first.bias).unsqueeze(0))
        for layer in self.rest:
            h = F.relu(layer(h))
        joint = torch.cat([p.unsqueeze(1) * q.unsqueeze(0), h], -1)
        return self.out(joint).squeeze(-1)


def images(batch, channels=1, size=28):
    return (torch.rand(batch, channels, size, size), torch.randint(0, 10, (batch,)))


def sentences(batch, length=64, vocab=5000):
    return (torch.randint(1, vocab, (batch, length)), torch.ones(batch, length),
            torch.randint(0, 2, (batch,)))


def interactions(users=1024, items=2000, batch=128):
    rel = torch.full((batch, items), -1.0)
    for row in rel:
        idx = torch.randint(0, items, (5,))
        row[idx[1:]] = 0.0
        row[idx[0]] = 1.0
    return torch.randint(0, users, (batch,)), rel


STEPS = {
    "mlp-kd": "MLP KD: teacher 784-1200-1200-10 live, student 784-256-256-10, batch 128",
    "mlp-kd-cached": "the same student, teacher logits cached, batch 128",
    "mlp-alone": "the same student on labels alone (CE), batch 128",
    "cnn-kd": "LeNet-5 KD on 1x28x28, LeNet (32, 64; 256, 128) teacher live, batch 128",
    "mobilenet-kd-cached": "MobileNet-style student, teacher logits cached, batch 128",
    "transformer-kd-cached": "2-layer transformer (d 128, 4 heads, FFN 256), seq 64, batch 32",
    "bilstm-kd-cached": "BiLSTM (128, 150, 200), seq 64, batch 64",
    "textcnn-kd-cached": "TextCNN (128; 3, 4, 5; 100), seq 64, batch 64",
    "neumf-mf-kd": "NeuMF (16; 32-16) live -> MF (8), 1024 users x 2000 items, batch 128",
    "resnet-alone": "ResNet (width 16, one block per stage, group norm) on labels, batch 128",
    "resnet20-alone": "RepDistiller's resnet20 (batch norm) on labels, 3x32x32, batch 64",
    "minilm-forward": "all-MiniLM-L6-v2 forward pass, no grad, eval, a real SST-2 batch of 32",
    "minilm-finetune": "all-MiniLM-L6-v2 fine-tuning step (all layers, CE, AdamW 5e-5), batch 32",
}


# Steps whose 10-step check runs in f64 on both sides: with batch norm and AdamW, f32 rounding
# alone moves the 10th loss by 7e-4 relative (PyTorch in f32 against PyTorch in f64), more than
# the check allows; in f64 the two frameworks' arithmetic is compared, not their rounding.
CHECK_IN_F64 = {"resnet20-alone"}


def our_names(module):
    """`module`'s parameters under the names our models give them (for the weight export)."""
    sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    if isinstance(module, MLP):
        return {(f"hidden{int(k.split('.')[1]) + 1}.{k.split('.')[2]}" if k.startswith("hidden.")
                 else k): v for k, v in sd.items()}
    if isinstance(module, (LeNet, ZooResNet)):
        return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    if isinstance(module, TextCNN):
        out = {"embedding.weight": sd["embedding.weight"],
               "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}
        for conv in module.convs:
            i = list(module.convs).index(conv)
            w = sd[f"convs.{i}.weight"]  # [filters, embedding, k]; ours reads window j's embedding
            k = w.shape[2]              # at j * embedding + e
            out[f"conv{k}.weight"] = w.permute(0, 2, 1).reshape(w.shape[0], -1).contiguous()
            out[f"conv{k}.bias"] = sd[f"convs.{i}.bias"]
        return out
    if isinstance(module, Bert):
        e = "embeddings."
        out = {e + "word_embeddings.weight": sd["words.weight"],
               e + "position_embeddings.weight": sd["positions.weight"],
               e + "token_type_embeddings.weight": sd["segments.weight"],
               e + "LayerNorm.weight": sd["norm.weight"], e + "LayerNorm.bias": sd["norm.bias"],
               "classifier.weight": sd["head.weight"], "classifier.bias": sd["head.bias"]}
        for i in range(len(module.layers)):
            src, dst = f"layers.{i}.", f"encoder.layer.{i}."
            w, b = sd[src + "self_attn.in_proj_weight"], sd[src + "self_attn.in_proj_bias"]
            for j, part in enumerate(("query", "key", "value")):
                d = w.shape[1]
                out[dst + f"attention.self.{part}.weight"] = w[j * d:(j + 1) * d].contiguous()
                out[dst + f"attention.self.{part}.bias"] = b[j * d:(j + 1) * d].contiguous()
            for theirs, ours in (("self_attn.out_proj", "attention.output.dense"),
                                 ("norm1", "attention.output.LayerNorm"),
                                 ("linear1", "intermediate.dense"), ("linear2", "output.dense"),
                                 ("norm2", "output.LayerNorm")):
                out[dst + ours + ".weight"] = sd[src + theirs + ".weight"]
                out[dst + ours + ".bias"] = sd[src + theirs + ".bias"]
        return out
    raise SystemExit(f"no weight export for {type(module).__name__}")


def build(name, export=None, batch_file=None, weights=None):
    """The step `name`: a function that trains once and returns the loss. With `export` (a
    folder), first writes `inputs.safetensors` there: the student's and a live teacher's weights
    under our names (`student.<name>`, `teacher.<name>`), the batch (`input.<name>`, `targets`)
    and cached teacher logits (`teacher_logits`). The MiniLM steps read their batch from
    `batch_file` and the pretrained weights from `weights`."""
    teacher, cached, inputs = None, None, None
    lr, frozen = 1e-3, False
    if name.startswith("minilm-"):
        from safetensors.torch import load_file
        if batch_file is None or weights is None:
            sys.exit(f"{name} needs --batch and --weights (cargo xtask bench passes them)")
        inputs = load_file(batch_file)
        student = minilm(weights)
        args = (inputs["input.pieces"].long(), inputs["input.pieces_mask"])
        y, loss, live = inputs["targets"].long(), None, False
        lr, frozen = 5e-5, name == "minilm-forward"
    elif name == "resnet20-alone":
        x, y = images(64, 3, 32)
        student, args, loss, live = ZooResNet(), (x,), None, False
    elif name in ("mlp-kd", "mlp-kd-cached", "mlp-alone", "cnn-kd", "mobilenet-kd-cached",
                "resnet-alone"):
        x, y = images(128)
        student = {"cnn-kd": lambda: LeNet(), "mobilenet-kd-cached": lambda: MobileNet(),
                   "resnet-alone": lambda: ResNet()}.get(name, lambda: MLP([256, 256]))()
        if name in ("mlp-kd", "mlp-kd-cached"):
            teacher = MLP([1200, 1200])
        elif name == "cnn-kd":
            teacher = LeNet((32, 64), (256, 128))
        elif name == "mobilenet-kd-cached":
            teacher = MLP([64])
        args, loss = (x,), kd_loss
        live = name in ("mlp-kd", "cnn-kd")
    elif name in ("transformer-kd-cached", "bilstm-kd-cached", "textcnn-kd-cached"):
        batch = 32 if name.startswith("transformer") else 64
        ids, mask, y = sentences(batch)
        student = {"transformer-kd-cached": Bert, "bilstm-kd-cached": BiLSTM,
                   "textcnn-kd-cached": TextCNN}[name]()
        teacher, args, loss, live = TextCNN(filters=16), (ids, mask), kd_loss, False
    elif name == "neumf-mf-kd":
        u, y = interactions()
        student, teacher = MF(1024, 2000, 8), NeuMF(1024, 2000)
        args, loss, live = (u,), ranking_kd_loss, True
    else:
        sys.exit(f"no step {name}; the steps: {', '.join(STEPS)}")
    if export is not None and name in CHECK_IN_F64:
        student = student.double()
        args = tuple(a.double() if a.is_floating_point() else a for a in args)
    if teacher is not None:
        teacher.eval()
        if not live:
            with torch.no_grad():
                cached = teacher(*args)
    if export is not None:
        from pathlib import Path

        from safetensors.torch import save_file
        tensors = {f"student.{k}": v for k, v in our_names(student).items()}
        if teacher is not None and cached is None:
            tensors.update({f"teacher.{k}": v for k, v in our_names(teacher).items()})
        if cached is not None:
            tensors["teacher_logits"] = cached.contiguous()
        if inputs is not None:
            tensors.update(inputs)
        else:
            names = ("image",) if len(args) == 1 else ("words", "words_mask")
            tensors.update({f"input.{n}": a.contiguous() for n, a in zip(names, args)})
            tensors["targets"] = y.contiguous()
        Path(export).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(Path(export) / "inputs.safetensors"))
    if frozen:
        # The teacher cache's forward pass: evaluation mode, no autograd.
        student.eval()

        def forward():
            with torch.no_grad():
                return F.cross_entropy(student(*args), y).item()

        return forward
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2 if name == "neumf-mf-kd" else lr,
                                  weight_decay=0.0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        s = student(*args)
        if teacher is None:
            total = F.cross_entropy(s, y)
        else:
            if cached is not None:
                t = cached
            else:
                with torch.no_grad():
                    t = teacher(*args)
            total = loss(s, t, y)
        total.backward()
        optimizer.step()
        return total.item()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", nargs="?")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--batch", metavar="FILE",
                        help="the MiniLM steps' batch (`bench-step <step> --write-batch FILE`)")
    parser.add_argument("--weights", metavar="FILE", help="all-MiniLM-L6-v2's model.safetensors")
    parser.add_argument("--export", metavar="DIR",
                        help="write the weights and inputs to DIR/inputs.safetensors, then print "
                             "the losses of 10 steps as JSON (for `cargo xtask bench --check`)")
    a = parser.parse_args()
    if a.list or not a.step:
        for name, what in STEPS.items():
            print(f"{name}\t{what}")
        return
    if a.threads:
        torch.set_num_threads(a.threads)
        torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    step = build(a.step, a.export, a.batch, a.weights)
    if a.export:
        print(json.dumps({"step": a.step, "losses": [step() for _ in range(10)]}))
        return
    for _ in range(3):
        step()
    started, steps, loss = time.perf_counter(), 0, float("nan")
    while steps < 5 or time.perf_counter() - started < a.seconds:
        loss = step()
        steps += 1
    elapsed = time.perf_counter() - started
    print(json.dumps({"step": a.step, "steps_per_s": steps / elapsed, "steps": steps,
                      "seconds": elapsed,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "loss": loss, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
