"""docs/benchmarks.rst from one run of bench_train.py: every number in it comes from that run."""
import statistics

SYSTEM_TITLES = {"cyconv": "cyconv", "torch NCHW": "PyTorch NCHW",
                 "torch channels_last": "PyTorch channels_last"}

INTRO = """\
Benchmarks
==========

.. This file is written by benchmarks/bench_train.py: edit the script, not this file.

Every number below comes from one run of one command, on the machine described
under *Run*; cyconv is only ever compared with PyTorch figures of that same run.

How to regenerate
-----------------

::

    python benchmarks/bench_train.py            # full run: writes this file
    python benchmarks/bench_train.py --quick    # smoke test: small batches, 1 repeat

``--networks``, ``--threads``, ``--repeats``, ``--no-memory`` and ``--output`` narrow or
redirect a run; ``python -m cyconv.profile_cli`` gives the per-layer view of any network.

How it measures
---------------

- Networks: the default recipe's ``models.small(3, 128)`` (128 px), the reference
  network ``models.reference(3)`` (224 px), the ``--model resnet`` recipe's
  ``models.resnet_small(4)`` (128 px), ``models.resnet18(1000)`` and
  ``models.mobilenet_v2(1000)`` (224 px).  PyTorch runs ``models.to_torch(model)``
  (torchvision's structure) with the same weights, in both memory layouts.
- Training step: forward, cross-entropy loss, backward, SGD (momentum 0.9, weight
  decay 5e-4).  Inference: forward in eval mode (``cyconv.no_grad``,
  ``torch.inference_mode``), where cyconv folds each BatchNorm2d into the
  convolution before it and applies the activation after them in the convolution's
  kernels; PyTorch's eager mode runs them as layers.  Random images and labels.
- A run: warm-up steps, then timed steps with cyconv and PyTorch's two layouts
  alternating step by step in one process (their order rotating); a system's images/s
  comes from its median step.  Each case is run {repeats} time(s), the repeats of all
  cases interleaved; cells give the median and [range] of the repeats.  The ratio is
  cyconv / PyTorch's faster layout, taken within each run.
- GFLOP/s: convolutions and linear layers, 2 FLOPs per multiply-add of the direct
  computation (``cyconv.profiling.flop_counts``; training counts the backward's weight
  and input gradients, without the first layer's input gradient), times the median
  images/s.  The share is of the sgemm peak of this run at the same thread count.
- OpenMP: both libraries share one runtime in a process, with the settings of the one
  imported first; here: {openmp}'s.
"""


def spread(values):
    """'median [low-high]' of values (just the median for one value)."""
    med = statistics.median(values)
    digits = 2 if med < 10 else 1 if med < 100 else 0
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def list_table(header, rows, widths=None):
    """An RST list-table directive."""
    lines = [".. list-table::", "   :header-rows: 1"]
    if widths:
        lines.append("   :widths: " + " ".join(str(w) for w in widths))
    lines.append("")
    for row in [header] + rows:
        lines += [f"   * - {row[0]}"] + [f"     - {cell}" for cell in row[1:]]
    return lines + [""]


def section(title, underline="-"):
    return ["", title, underline * len(title), ""]


def run_section(info, peaks):
    lines = section("Run") + [
        f"- date: {info['date']}; total time of the command: {info['minutes']:.1f} min",
        f"- CPU: {info['cpu']} ({info['cores']} cores available)",
        (f"- cyconv {info['cyconv']}, numpy {info['numpy']}, torch {info['torch']}, "
         f"Python {info['python']}"),
        (f"- load average (1, 5, 15 min) at the start: {info['load_start']}; at the end: "
         f"{info['load_end']} (the machine is shared: the ranges show how noisy it was)"),
        "- sgemm peak (numpy float32, 2048 x 2048 matrices, the best of 3 products, "
        "measured at the start and at the end): "
        + "; ".join(f"{t} thread(s) {a:.0f} and {b:.0f} GFLOP/s" for t, (a, b) in peaks.items())
        + " (the higher is the peak used below)"]
    if info["quick"]:
        lines.append("- **--quick run (smoke test): small batches, 2 steps, 1 repeat; "
                     "not numbers to quote**")
    return lines


def speed_rows(kind, flops, speed, peaks):
    rows = []
    for (case, threads), repeats in speed.items():
        if case.kind != kind:
            continue
        cy = [r["cyconv"] for r in repeats]
        torch_names = [name for name in repeats[0] if name != "cyconv"]
        per_image = flops[case.network.name][kind]
        peak = max(peaks[threads])
        row = [case.network.name, str(case.batch), str(threads), spread(cy)]
        row += [spread([r[name] for r in repeats]) for name in torch_names]
        gflops = statistics.median(cy) * per_image / 1e9
        row.append(f"{gflops:.1f} ({gflops / peak:.0%})")
        if torch_names:
            faster = [max(r[name] for name in torch_names) for r in repeats]
            torch_gflops = statistics.median(faster) * per_image / 1e9
            row.append(f"{torch_gflops:.1f} ({torch_gflops / peak:.0%})")
            row.append("**" + spread([c / f for c, f in zip(cy, faster)]) + "x**")
        rows.append(row)
    return rows


def speed_section(title, kind, flops, speed, peaks):
    first = next(iter(speed.values()))[0]
    torch_names = [name for name in first if name != "cyconv"]
    header = ["network", "batch", "threads", "cyconv img/s"]
    header += [SYSTEM_TITLES[name] + " img/s" for name in torch_names]
    header.append("cyconv GFLOP/s (% peak)")
    if torch_names:
        header += ["faster PyTorch GFLOP/s (% peak)", "cyconv / faster PyTorch"]
    return section(title) + list_table(header, speed_rows(kind, flops, speed, peaks))


def scaling_section(speed):
    """cyconv's and PyTorch's speed-up from the fewest to the most threads."""
    thread_counts = sorted({threads for _, threads in speed})
    if len(thread_counts) < 2:
        return []
    few, many = thread_counts[0], thread_counts[-1]
    rows = []
    for (case, threads), repeats in speed.items():
        if threads != many or (case, few) not in speed:
            continue
        medians = {}
        for name in repeats[0]:
            rate = {t: statistics.median(r[name] for r in speed[(case, t)]) for t in (few, many)}
            medians[name] = f"{rate[many] / rate[few]:.2f}x"
        rows.append([case.label] + list(medians.values()))
    header = ["case"] + [SYSTEM_TITLES[name] for name in next(iter(speed.values()))[0]]
    return (section(f"{many} threads vs {few}")
            + [(f"Median images/s on {many} threads over the median on {few} (runs of the "
                "same case, one after the other)."), ""]
            + list_table(header, rows))


def memory_section(memory):
    if memory is None:
        return []
    reports = memory["reports"]
    header = ["system", "RSS after imports (MB)", "after building (MB)", "peak RSS (MB)",
              "peak - after imports (MB)", f"growth over {reports[0]['steps']} steps (MB)"]
    rows = [[SYSTEM_TITLES[r["system"]], f"{r['after_imports']:.0f}", f"{r['after_build']:.0f}",
             f"{r['peak']:.0f}", f"{r['peak'] - r['after_imports']:.0f}",
             f"{r['after_steps'] - r['after_warmup']:+.1f}"] for r in reports]
    lines = section("Memory") + [
        (f"Training {memory['network']} at {memory['image_size']} px, batch "
         f"{memory['batch']}, {memory['threads']} threads, each system alone in a child "
         "process (``benchmarks/memory_child.py``: it builds the network from its spec, so no "
         f"process holds the other library's model).  Growth: RSS after {reports[0]['steps']} "
         f"more steps minus RSS after {reports[0]['warmup']} warm-up steps."), ""]
    lines += list_table(header, rows)
    torch_peaks = [r["peak"] for r in reports if r["system"] != "cyconv"]
    if torch_peaks:
        lines.append(f"cyconv's peak RSS / PyTorch's lower one: "
                     f"**{reports[0]['peak'] / min(torch_peaks):.2f}x**.")
    return lines


def write_report(path, info, peaks, flops, speed, memory):
    """Write the document to ``path`` and return its text."""
    lines = [INTRO.format(repeats=info["repeats"], openmp=info["openmp"])]
    lines += run_section(info, peaks)
    lines += speed_section("Training", "train", flops, speed, peaks)
    lines += speed_section("Inference", "infer", flops, speed, peaks)
    lines += scaling_section(speed)
    lines += memory_section(memory)
    text = "\n".join(lines).rstrip() + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text
