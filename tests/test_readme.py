"""README.rst is a user guide whose commands must work as written from a fresh clone
next to ../shared: every example command's arguments parse, every input it names
exists or is written by a command before it, and the Python examples run."""
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.rst").read_text()
SHARED = ROOT.parent / "shared" / "datasets"


def code_blocks(language):
    """The bodies of the README's ``.. code-block:: language`` blocks."""
    blocks = []
    for match in re.finditer(rf"\.\. code-block:: {language}\n\n((?:(?:    .*)?\n)+)", README):
        blocks.append("\n".join(line[4:] for line in match.group(1).splitlines()))
    return blocks


def commands():
    """Every shell command of the README, continuation lines joined, split at &&."""
    found = []
    for block in code_blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#")[0].strip()
            found += [part.strip() for part in line.split("&&") if part.strip()]
    return found


def example(script):
    spec = importlib.util.spec_from_file_location(f"readme_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_command_parses_and_names_inputs_that_exist(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    produced = {ROOT / "runs" / "quickstart" / "best.safetensors",
                ROOT / "runs" / "animals" / "best.safetensors"}   # by the commands above
    checked = 0
    for command in commands():
        words = shlex.split(command)
        if words[:1] == ["mpirun"]:   # mpirun -n N python ...
            words = words[words.index("python"):]
        if words[:1] != ["python"] or not words[1].startswith("examples/"):
            continue
        args = example(words[1]).parse_args(words[2:])
        inputs = {k: v for k, v in vars(args).items() if k != "out"}   # --out is written
        for value in inputs.values():
            for item in value if isinstance(value, list) else [value]:
                path = ROOT / str(item)
                if str(item).startswith("../shared") and not SHARED.is_dir():
                    continue
                if str(item).startswith(("../", "runs/")):
                    assert path.resolve().exists() or path in produced, (command, item)
        checked += 1
    assert checked >= 8


def test_the_install_commands_are_the_two_of_the_ci():
    install = [c for c in commands() if c.startswith("pip install")]
    assert install[:2] == ["pip install -e .", 'pip install -e ".[test]"']
    assert "python -m pytest" in commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in ci and "run_pytest -q\n" in ci


def test_the_layer_contract_example_runs():
    block = next(b for b in code_blocks("python") if "class ResidualUnit" in b)
    namespace = {}
    exec(compile(block, "README.rst", "exec"), namespace)
    model = namespace["model"]
    assert namespace["loss"] > 0 and len(model.parameters()) == 7


def test_the_layer_contract_block_is_right_by_finite_differences(rng):
    """The README's hand-written backward of ResidualUnit agrees with finite differences."""
    import numpy as np

    from cyconv import nn
    block = next(b for b in code_blocks("python") if "class ResidualUnit" in b)
    namespace = {}
    exec(compile(block.split("cyconv.manual_seed")[0], "README.rst", "exec"), namespace)
    unit = namespace["ResidualUnit"](2)
    unit.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False, dtype=np.float64, seed=1)
    unit.bn = nn.BatchNorm2d(2, dtype=np.float64)
    x = rng.standard_normal((2, 2, 4, 5))
    R = rng.standard_normal(x.shape)
    unit(x)
    dx = unit.backward(R)
    from conftest import finite_difference
    np.testing.assert_allclose(dx, finite_difference(lambda v: (unit(v) * R).sum(), x),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["docs/design.rst", "docs/benchmarks.rst", "docs/conv3x3.rst",
                                  "docs/results.rst", "docs/deploying.rst", "docs/distributed.rst",
                                  "CHANGELOG.rst"])
def test_linked_documents_exist(name):
    assert name in README and (ROOT / name).is_file()
