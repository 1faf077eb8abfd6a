"""The benchmarked networks and the systems that run them: cyconv, and PyTorch in its two
memory layouts (NCHW and channels_last) with the same weights.

A training step is forward + cross-entropy loss + backward + an SGD update with
momentum 0.9 and weight decay 5e-4, as each library's users write it; inference is
a forward in eval mode (cyconv.no_grad, torch.inference_mode).  torch is imported by
the caller, before cyconv (see bench_train.py), and handed in.
"""
from dataclasses import dataclass

import numpy as np

import cyconv
from cyconv import models, nn, optim

LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.9, 5e-4


@dataclass(frozen=True)
class Network:
    """A benchmarked network: how to build it, its input and the batches it is timed at.

    steps/warmup: timed and warm-up steps per run (fewer for the large networks, whose
    steps take seconds)."""

    name: str
    build: object          # () -> cyconv model
    image_size: int
    classes: int
    train_batches: tuple
    infer_batch: int
    steps: int
    warmup: int


NETWORKS = {n.name: n for n in [
    Network("default", lambda: models.small(3, 128), 128, 3, (32,), 64, steps=20, warmup=3),
    Network("reference", lambda: models.reference(3), 224, 3, (16,), 64, steps=20, warmup=3),
    # the --model resnet recipe's network, as it trains on the four classes
    Network("resnet", lambda: models.resnet_small(4), 128, 4, (32,), 64, steps=20, warmup=3),
    Network("resnet18", lambda: models.resnet18(1000), 224, 1000, (16, 32), 32, steps=5,
            warmup=1),
    Network("mobilenet_v2", lambda: models.mobilenet_v2(1000), 224, 1000, (32,), 32, steps=5,
            warmup=1),
]}

TORCH_LAYOUTS = ("torch NCHW", "torch channels_last")


def random_batch(network, batch, seed=0):
    """(images (batch, 3, S, S) float32, labels (batch,) int64) drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, network.image_size, network.image_size), np.float32)
    return x, rng.integers(0, network.classes, batch)


class CyconvSystem:
    def __init__(self, model, x, y, train):
        self.model, self.x, self.y = (model.train() if train else model.eval()), x, y
        self.loss_fn = nn.CrossEntropyLoss()
        self.optimizer = optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                                   weight_decay=WEIGHT_DECAY)

    def train_step(self):
        self.loss_fn(self.model(self.x), self.y)
        self.model.backward(self.loss_fn.backward(), input_grad=False)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def infer(self):
        with cyconv.no_grad():
            self.model(self.x)


class TorchSystem:
    def __init__(self, torch, model, x, y, train, channels_last):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.torch = torch
        self.model = model.to(memory_format=layout).train(train)
        self.x = torch.from_numpy(x).contiguous(memory_format=layout)
        self.y = torch.from_numpy(y)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                                         weight_decay=WEIGHT_DECAY)

    def train_step(self):
        self.optimizer.zero_grad()
        self.loss_fn(self.model(self.x), self.y).backward()
        self.optimizer.step()

    def infer(self):
        with self.torch.inference_mode():
            self.model(self.x)


def torch_model(torch, model):
    """The PyTorch equivalent of cyconv ``model`` (torchvision's structure), same weights."""
    twin = models.to_torch(model)
    twin.load_state_dict({key: torch.from_numpy(value.copy())
                          for key, value in model.state_dict().items()})
    return twin


def build_systems(torch, network, batch, train, seed=0):
    """{system name: a step function} for cyconv and, when torch is given, PyTorch's two
    layouts, all starting from the same weights and timed on the same batch."""
    cyconv.manual_seed(seed)
    model = network.build()
    x, y = random_batch(network, batch, seed)
    systems = {"cyconv": CyconvSystem(model, x, y, train)}
    if torch is not None:
        for name in TORCH_LAYOUTS:
            systems[name] = TorchSystem(torch, torch_model(torch, model), x, y, train,
                                        channels_last=name.endswith("channels_last"))
    return {name: (s.train_step if train else s.infer) for name, s in systems.items()}
