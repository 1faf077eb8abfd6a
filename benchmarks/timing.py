"""What the layer benchmarks share: the time of one call, a cyconv module's forward and
backward as timed tasks, rounds of tasks taking turns, and "median [low-high]" cells."""
import statistics
import time


def seconds(task, clock=time.perf_counter):
    """How long one call of task takes, by clock."""
    start = clock()
    task()
    return clock() - start


def passes(module, x, dy, clock=time.perf_counter):
    """{"forward": task, "backward": task} of a cyconv module, each task returning its
    seconds; forward discards what it saved (it is not backpropagated), backward times
    the backward of an untimed forward run just before."""
    def forward():
        elapsed = seconds(lambda: module(x), clock)
        module.discard_saved()
        return elapsed

    def backward():
        module(x)
        return seconds(lambda: module.backward(dy), clock)
    return {"forward": forward, "backward": backward}


def rounds(tasks, count):
    """{name: [what the task returned in each round]}: after a warm-up call of every task
    (workspaces, caches, oneDNN primitives), every task once per round, in turn."""
    for task in tasks.values():
        task()
    results = {name: [] for name in tasks}
    for _ in range(count):
        for name, task in tasks.items():
            results[name].append(task())
    return results


def median_range(values, scale=1e3, digits=2, width=0):
    """'median [low-high]' of values times scale (default: seconds as milliseconds), the
    median padded to width."""
    values = [v * scale for v in values]
    return (f"{statistics.median(values):{width}.{digits}f} "
            f"[{min(values):.{digits}f}-{max(values):.{digits}f}]")
