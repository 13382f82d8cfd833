"""PyTorch reference of the three cmr networks, for `cargo xtask bench`.

The same architectures as crates/cmr-models (layer for layer; the parameter
counts are checked), timed the same way as `cargo bench -p cmr-models --bench
step`: one training step (train-mode forward, soft-Dice loss, backward; no
optimiser) at batch 4 and 8, inference (eval-mode forward + argmax) at batch 1
and 20, 96x96 inputs, median of N runs after one warm-up. Prints one JSON
object per line.

Usage: python3 torch_reference.py --threads 2 --runs 5 [--widths seed,small] [--archs unet,...]
Needs torch (a venv with `pip install torch`).
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def cbr(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def stack(cin, widths):
    layers, c = [], cin
    for w in widths:
        layers.append(cbr(c, w))
        c = w
    return nn.Sequential(*layers)


class UNet(nn.Module):
    def __init__(self, filters, classes=4):
        super().__init__()
        self.enc = nn.ModuleList()
        c = 1
        for f in filters:
            self.enc.append(stack(c, [f, f]))
            c = f
        self.up = nn.ModuleList([nn.ConvTranspose2d(filters[i + 1], filters[i], 2, stride=2) for i in range(len(filters) - 1)])
        self.dec = nn.ModuleList([stack(2 * filters[i], [filters[i], filters[i]]) for i in range(len(filters) - 1)])
        self.head = nn.Conv2d(filters[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, e in enumerate(self.enc):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = e(x)
            skips.append(x)
        skips.pop()
        for i in reversed(range(len(self.dec))):
            x = self.dec[i](torch.cat([skips.pop(), self.up[i](x)], 1))
        return self.head(x)


class UNet3Plus(nn.Module):
    def __init__(self, filters, branch, classes=4):
        super().__init__()
        d = len(filters)
        stage = branch * d
        self.enc = nn.ModuleList()
        c = 1
        for f in filters:
            self.enc.append(stack(c, [f, f]))
            c = f
        self.branches = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for level in range(d - 1):
            chans = [filters[s] if (s <= level or s == d - 1) else stage for s in range(d)]
            self.branches.append(nn.ModuleList([cbr(ch, branch) for ch in chans]))
            self.fuse.append(cbr(stage, stage))
        self.head = nn.Conv2d(stage, classes, 3, padding=1)

    def forward(self, x):
        d = len(self.enc)
        enc = []
        for i, e in enumerate(self.enc):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = e(x)
            enc.append(x)
        dec = [None] * d
        dec[d - 1] = enc[-1]
        for level in reversed(range(d - 1)):
            parts = []
            for s, br in enumerate(self.branches[level]):
                if s < level:
                    inp = F.max_pool2d(enc[s], 2 ** (level - s))
                elif s == level:
                    inp = enc[s]
                else:
                    inp = F.interpolate(dec[s], scale_factor=2 ** (s - level), mode="bilinear", align_corners=False)
                parts.append(br(inp))
            dec[level] = self.fuse[level](torch.cat(parts, 1))
        return self.head(dec[0])


class SegNet(nn.Module):
    def __init__(self, filters, convs, classes=4):
        super().__init__()
        self.enc = nn.ModuleList()
        self.dec = nn.ModuleList()
        c = 1
        for b, (f, n) in enumerate(zip(filters, convs)):
            self.enc.append(stack(c, [f] * n))
            widths = [f] * (n - 1) + ([filters[b - 1]] if b > 0 else [])
            self.dec.append(stack(f, widths))
            c = f
        self.head = nn.Conv2d(filters[0], classes, 3, padding=1)

    def forward(self, x):
        idx = []
        for e in self.enc:
            x, i = F.max_pool2d(e(x), 2, return_indices=True)
            idx.append(i)
        for dblock in reversed(self.dec):
            x = dblock(F.max_unpool2d(x, idx.pop(), 2))
        return self.head(x)


def build(arch, widths):
    small = widths == "small"
    if arch == "unet":
        return UNet([16, 32, 64, 128] if small else [64, 128, 256, 512])
    if arch == "unet3plus":
        return UNet3Plus([16, 32, 64, 128] if small else [64, 128, 256, 512], 16 if small else 64)
    return SegNet([16, 32, 64, 128, 128] if small else [64, 128, 256, 512, 512], [2, 2, 3, 3, 3])


EXPECTED = {"unet": 7_702_020, "unet3plus": 8_203_972, "segnet": 29_444_164}


def soft_dice_loss(logits, target):
    p = torch.softmax(logits, 1)
    t = F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    inter = (p * t).flatten(2).sum(-1)
    denom = p.flatten(2).sum(-1) + t.flatten(2).sum(-1)
    dice = (2 * inter + 1e-6) / (denom + 1e-6)
    return 1 - dice[:, 1:].mean()


def median_ms(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--widths", default="seed,small")
    ap.add_argument("--archs", default="unet,unet3plus,segnet")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for widths in args.widths.split(","):
        for arch in args.archs.split(","):
            model = build(arch, widths)
            params = sum(p.numel() for p in model.parameters())
            if widths == "seed" and params != EXPECTED[arch]:
                raise SystemExit(f"{arch}: {params} parameters, expected {EXPECTED[arch]}")
            for b in (4, 8):
                x = torch.randn(b, 1, 96, 96)
                y = torch.randint(0, 4, (b, 96, 96))
                model.train()

                def step():
                    model.zero_grad(set_to_none=True)
                    soft_dice_loss(model(x), y).backward()

                print(json.dumps({"arch": arch, "widths": widths, "what": f"train b{b}", "ms": median_ms(step, args.runs), "parameters": params}), flush=True)
            model.eval()
            for b in (1, 20):
                x = torch.randn(b, 1, 96, 96)

                def infer():
                    with torch.no_grad():
                        model(x).argmax(1)

                print(json.dumps({"arch": arch, "widths": widths, "what": f"infer b{b}", "ms": median_ms(infer, args.runs), "parameters": params}), flush=True)


if __name__ == "__main__":
    main()
