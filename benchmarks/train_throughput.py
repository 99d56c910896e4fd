"""Training throughput on CIFAR-100-shaped synthetic tensors (VGG-16-BN SelectiveNet, SYNC loss).

Runs the real training code (``abstain.training.loop.train_one_epoch``: DataLoader with pinned
memory, non-blocking copies, bf16 autocast and channels_last on CUDA) over random
``[N, 3, 32, 32]`` images with 100 classes, and reports images per second after a warm-up
epoch. On CUDA it writes the figure under ``## Training throughput`` in ``docs/benchmarks.md``
with the GPU's name; on CPU it only prints (a CPU figure says nothing about the GPU path).

    python benchmarks/train_throughput.py                    # on a GPU machine
    python benchmarks/train_throughput.py --images 256 --batch-size 32   # CPU smoke test
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from abstain.io import atomic_write_text
from abstain.training.loop import Runtime, make_loader, train_one_epoch
from abstain.training.losses import SyncLoss
from abstain.training.model import ModelConfig, SelectiveNet

ROOT = Path(__file__).resolve().parents[1]


def measure(images: int, batch_size: int, runtime: Runtime) -> float:
    """Images per second of one timed epoch of ``images`` samples (after one warm-up epoch)."""
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(images, 3, 32, 32), torch.randint(0, 100, (images,)))
    model = SelectiveNet(ModelConfig("vgg16_bn", 100, 3, 32, (0.5,) * 3, (0.25,) * 3))
    model.to(runtime.device, memory_format=runtime.memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loader = make_loader(data, batch_size, train=True, seed=0, runtime=runtime, num_workers=2)
    loss = SyncLoss()
    # warm-up epoch: cuDNN autotuning, allocator growth, worker start-up
    train_one_epoch(model, loss, loader, optimizer, runtime, epoch=0, progress=False)
    if runtime.cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    train_one_epoch(model, loss, loader, optimizer, runtime, epoch=1, progress=False)
    if runtime.cuda:
        torch.cuda.synchronize()
    return (len(data) // batch_size) * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20480)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    torch.backends.cudnn.benchmark = True
    runtime = Runtime(torch.device("cuda" if cuda else "cpu"), amp=cuda, channels_last=cuda)
    rate = measure(args.images, args.batch_size, runtime)
    where = torch.cuda.get_device_name() if cuda else "CPU"
    line = (
        f"{rate:,.0f} images/s training VGG-16-BN SelectiveNet + SYNC on {where} "
        f"(batch {args.batch_size}, bf16 autocast {cuda}, channels_last {cuda}, "
        f"torch {torch.__version__})"
    )
    print(line)
    if not cuda:
        print("not written to docs/benchmarks.md: no GPU here")
        return
    section = (
        "## Training throughput\n\nCIFAR-100-shaped synthetic tensors, "
        f"`python benchmarks/train_throughput.py`:\n\n{line}.\n\n"
    )
    text = args.doc.read_text() if args.doc.is_file() else "# Benchmarks\n"
    pattern = re.compile(r"^## Training throughput\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(args.doc, text)


if __name__ == "__main__":
    main()
