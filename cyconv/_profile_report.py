"""What :func:`cyconv.profile` returns: per-layer records and the table they print as."""
from dataclasses import dataclass, field

from cyconv._checks import shape_text


@dataclass(frozen=True)
class Pass:
    """One direction (forward or backward) of one layer: the median milliseconds, FLOPs
    (0 for memory-bound layers) and bytes (0 for compute-bound layers and views), and
    the speeds they give; ``peak_share`` = gflop_s / the GEMM peak of the same run."""

    ms: float
    flops: int
    bytes: int
    gflop_s: float
    peak_share: float
    gb_s: float

    @classmethod
    def of(cls, ms, flops, nbytes, peak_gflop_s):
        gflop_s = flops / ms / 1e6 if ms > 0 else 0.0
        return cls(ms, flops, nbytes, gflop_s, gflop_s / peak_gflop_s,
                   nbytes / ms / 1e6 if ms > 0 else 0.0)

    def speed_text(self):
        if self.flops:
            return f"{self.gflop_s:6.1f} GFLOP/s {self.peak_share:4.0%}"
        return f"{self.gb_s:6.1f} GB/s" if self.bytes else "-"


@dataclass(frozen=True)
class LayerProfile:
    """One leaf layer: its dotted name (as in named_modules), type, shapes, and its
    forward and backward :class:`Pass` (backward None when there was none)."""

    name: str
    type: str
    input_shape: tuple
    output_shape: tuple
    forward: Pass
    backward: Pass = None

    @property
    def ms(self):
        return self.forward.ms + (self.backward.ms if self.backward else 0.0)


@dataclass(frozen=True)
class Profile:
    """The result of :func:`cyconv.profile`: ``layers`` in execution order and the step's
    totals (medians over the timed steps, in milliseconds).

    ``outside_ms``: time of the step spent outside leaf layers (the additions and
    concatenations of containers, the hooks' own calls); ``unhooked_ms``: the same step
    of the model without hooks (its layers fused as in training).  ``str(profile)`` is
    the table.
    """

    model: str
    input_shape: tuple
    dtype: str
    threads: int
    steps: int
    warmup: int
    backward: bool
    peak_gflop_s: float
    peak_measured: bool    # False: the caller gave the peak
    layers: list
    forward_ms: float
    backward_ms: float
    outside_ms: float
    unhooked_ms: float
    not_run: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def step_ms(self):
        return self.forward_ms + self.backward_ms

    def __str__(self):
        return self.table()

    def table(self):
        """The profile as text: a header, one line per layer, totals and notes."""
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        kind = ("training step (forward + backward)" if self.backward
                else "inference (forward, eval mode)")
        lines = [(f"cyconv.profile: {self.model}, input {shape_text(self.input_shape)} "
                  f"{self.dtype}, {kind}, {self.threads} thread(s)"),
                 (f"GEMM peak {self.peak_gflop_s:.1f} GFLOP/s ("
                  + (f"numpy {self.dtype} matmul 2048^3, {self.threads} thread(s), measured "
                     "in this run" if self.peak_measured else "given by the caller")
                  + f"); median of {self.steps} step(s) after {self.warmup} warm-up"),
                 ("speed: Conv2d/Linear in GFLOP/s (2 per multiply-add of the direct "
                  "computation) and its share of the GEMM peak; other layers in GB/s of their "
                  "input and output arrays, each counted once (a lower bound)"),
                 "",
                 f"{'layer':{width}s}  {'type':17s} {'output':>17s} {'fwd ms':>8s}  "
                 f"{'fwd speed':20s} " + (f"{'bwd ms':>8s}  {'bwd speed':20s} "
                                          if self.backward else "") + f"{'share':>6s}"]
        for layer in self.layers:
            back = layer.backward
            output = "x".join(str(s) for s in layer.output_shape)
            backward = (f"{back.ms if back else 0:8.2f}  {back.speed_text() if back else '-':20s} "
                        if self.backward else "")
            lines.append(
                f"{layer.name:{width}s}  {layer.type:17.17s} {output:>17s} "
                f"{layer.forward.ms:8.2f}  {layer.forward.speed_text():20s} {backward}"
                f"{layer.ms / self.step_ms:6.1%}")
        lines += self._totals()
        return "\n".join(lines)

    def _totals(self):
        leaf_ms = sum(layer.ms for layer in self.layers)
        flops = sum(layer.forward.flops + (layer.backward.flops if layer.backward else 0)
                    for layer in self.layers)
        backward = f", backward {self.backward_ms:.2f}" if self.backward else ""
        lines = ["",
                 (f"leaf layers       {leaf_ms:9.2f} ms  (the sum of their medians; "
                  f"{flops / 1e9:.2f} GFLOP in Conv2d/Linear: {flops / leaf_ms / 1e6:.1f} "
                  "GFLOP/s over that time)"),
                 (f"outside leaves    {self.outside_ms:9.2f} ms  (containers' additions and "
                  "concatenations, the hooks themselves)"),
                 (f"profiled step     {self.step_ms:9.2f} ms  (forward {self.forward_ms:.2f}"
                  f"{backward})"),
                 (f"step without hooks{self.unhooked_ms:9.2f} ms  (the model as it runs: "
                  "layers fused inside containers; timed alternately)")]
        if self.not_run:
            lines.append(f"leaf modules not called: {', '.join(self.not_run)}")
        return lines + [f"note: {note}" for note in self.notes]
