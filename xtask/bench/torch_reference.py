"""PyTorch reference of the three cmr networks, for `cargo xtask bench`.

The same architectures as crates/cmr-models (layer for layer; the parameter
counts are checked), timed the same way as `cargo bench -p cmr-models --bench
step`: one training step (train-mode forward, soft-Dice loss, backward; no
optimiser) at batch 4 and 8, inference (eval-mode forward + argmax) at batch 1
and 20, 96x96 inputs, median of N runs after one warm-up. Prints one JSON
object per line.

Usage: python3 torch_reference.py --threads 2 --runs 5 [--widths seed,small] [--archs unet,...]

With --serve it answers requests instead, for `cargo xtask bench`, which
alternates it with our benchmark run by run: one request per line on stdin,
`ARCH/WIDTHS WHAT` (e.g. `unet3plus/seed train b8`), one run of that case,
one line back, {"ms": ...} or {"error": "..."}. Networks and inputs are built
on first use and kept; the driver discards each case's first run.
Needs torch (a venv with `pip install torch`).

--mode says how PyTorch runs: `f32` (eager, the default), `bf16` (the
networks and inputs channels-last, the forward pass and the loss under
`torch.autocast("cpu", dtype=torch.bfloat16)`: oneDNN's AMX kernels where the
CPU has them), or `onnx` (inference only: each case's network exported to
ONNX and run by ONNX Runtime's CPU provider in f32, `pip install onnxruntime
onnx`; a training case is answered with an error).
"""

import argparse
import json
import statistics
import sys
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
    """The network, its parameter count checked against ours at the report's widths."""
    if widths not in ("seed", "small"):
        raise ValueError(f"unknown widths {widths!r} (seed, small)")
    small = widths == "small"
    if arch == "unet":
        model = UNet([16, 32, 64, 128] if small else [64, 128, 256, 512])
    elif arch == "unet3plus":
        model = UNet3Plus([16, 32, 64, 128] if small else [64, 128, 256, 512], 16 if small else 64)
    elif arch == "segnet":
        model = SegNet([16, 32, 64, 128, 128] if small else [64, 128, 256, 512, 512], [2, 2, 3, 3, 3])
    else:
        raise ValueError(f"unknown architecture {arch!r} (unet, unet3plus, segnet)")
    params = sum(p.numel() for p in model.parameters())
    if not small and params != EXPECTED[arch]:
        raise SystemExit(f"{arch}: {params} parameters, expected {EXPECTED[arch]}")
    return model


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


def case(model, what, mode="f32"):
    """The function that runs `what` ("train bN" or "infer bN") once."""
    kind, _, b = what.partition(" b")
    b = int(b)
    x = torch.randn(b, 1, 96, 96)
    if kind not in ("train", "infer"):
        raise ValueError(f"unknown case {what!r} (train bN, infer bN)")
    if mode == "onnx":
        return onnx_case(model, kind, x)
    if mode == "bf16":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16")
    if kind == "train":
        y = torch.randint(0, 4, (b, 96, 96))

        def step():
            model.train()
            model.zero_grad(set_to_none=True)
            with autocast():
                loss = soft_dice_loss(model(x).float(), y)
            loss.backward()

        return step

    def infer():
        model.eval()
        with torch.no_grad(), autocast():
            model(x).argmax(1)

    return infer


def onnx_case(model, kind, x):
    """An inference case on ONNX Runtime (f32, its CPU provider)."""
    if kind != "infer":
        raise ValueError("ONNX Runtime: inference cases only")
    import io

    import onnxruntime as ort

    model.eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, input_names=["x"], output_names=["y"], dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}

    def infer():
        session.run(None, feed)[0].argmax(1)

    return infer


def serve(mode):
    models, cases = {}, {}
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            label, what = line.split(" ", 1)
            arch, widths = label.split("/")
            if label not in models:
                models[label] = build(arch, widths)
            if line not in cases:
                cases[line] = case(models[label], what.strip(), mode)
            t = time.perf_counter()
            cases[line]()
            reply = {"ms": (time.perf_counter() - t) * 1e3}
        except Exception as e:  # answered, not fatal: the driver reports it
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--widths", default="seed,small")
    ap.add_argument("--archs", default="unet,unet3plus,segnet")
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--mode", choices=["f32", "bf16", "onnx"], default="f32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.serve:
        serve(args.mode)
        return
    for widths in args.widths.split(","):
        for arch in args.archs.split(","):
            model = build(arch, widths)
            params = sum(p.numel() for p in model.parameters())
            for what in ("train b4", "train b8", "infer b1", "infer b20"):
                if args.mode == "onnx" and what.startswith("train"):
                    continue
                ms = median_ms(case(model, what, args.mode), args.runs)
                print(json.dumps({"arch": arch, "widths": widths, "what": what, "mode": args.mode, "ms": ms, "parameters": params}), flush=True)

if __name__ == "__main__":
    main()
