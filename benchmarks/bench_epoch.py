"""One real training epoch on the animal photos: end to end vs pure compute.

End to end = the DataLoader (decoding, augmentation and normalisation in
background threads) feeding the training steps; pure compute = the same number
of training steps on one batch already in memory.  Loading hides behind compute
when the ratio end-to-end / compute time stays near 1 (target: within 1.15).
The first epoch also decodes every JPEG (then they are cached), so both the
first and a cached epoch are reported.

    python benchmarks/bench_epoch.py --data ../shared/datasets/animals
    python benchmarks/bench_epoch.py --data DIR --model reference --image-size 224
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cyconv  # noqa: E402
from cyconv import models, nn, optim  # noqa: E402
from cyconv.data import Augment, DataLoader, ImageFolder, Subset, compute_mean_std, split_indices  # noqa: E402


def train_step(model, loss_fn, opt, x, y):
    loss_fn(model(x), y)
    model.backward(loss_fn.backward(), input_grad=False)
    opt.step()
    opt.zero_grad()


def main():
    default_data = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "animals"
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data))
    p.add_argument("--classes", default="dog,panda,bird")
    p.add_argument("--model", default="small", choices=sorted(models.ARCHITECTURES))
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"no data folder {args.data}: give --data DIR (one sub-folder per class)")
    if args.threads:
        cyconv.set_num_threads(args.threads)
    classes = args.classes.split(",")
    dataset = ImageFolder(args.data, classes=classes, image_size=args.image_size)
    train, _, _ = split_indices([label for _, label in dataset.samples])
    mean, std = compute_mean_std(dataset, train)
    loader = DataLoader(Subset(dataset, train), args.batch_size, shuffle=True, augment=Augment(),
                        seed=0, drop_last=True, mean=mean, std=std, num_workers=args.workers)
    cyconv.manual_seed(0)
    model = models.create(args.model, len(classes), args.image_size)
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    steps = len(loader)
    images = steps * args.batch_size
    print(f"{args.model} at {args.image_size}px, batch {args.batch_size}, {steps} steps "
          f"({images} images), {cyconv.get_num_threads()} kernel threads, "
          f"{args.workers} loader threads")

    x, y = next(iter(loader))
    train_step(model, loss_fn, opt, x, y)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, loss_fn, opt, x, y)
    compute = time.perf_counter() - start
    print(f"pure compute:          {compute:6.1f} s  {images / compute:6.1f} img/s")
    for name in ("first epoch (decode)", "cached epoch"):
        start = time.perf_counter()
        for x, y in loader:
            train_step(model, loss_fn, opt, x, y)
        seconds = time.perf_counter() - start
        print(f"end to end, {name}: {seconds:6.1f} s  {images / seconds:6.1f} img/s  "
              f"({seconds / compute:.2f}x compute time)")


if __name__ == "__main__":
    main()
