"""The library's random number generator (weight initialisation, dropout seeds)."""
import numpy as np

_generator = np.random.default_rng()


def manual_seed(seed):
    """Seed cyconv's global generator: models built afterwards are reproducible."""
    global _generator
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"expected a non-negative int seed, got {seed!r}")
    _generator = np.random.default_rng(int(seed))


def generator(seed=None):
    """A generator of its own for an explicit seed, else the global one."""
    return _generator if seed is None else np.random.default_rng(seed)


def get_rng_state():
    """The global generator's state (a JSON-able dict), e.g. for a checkpoint."""
    return _generator.bit_generator.state


def set_rng_state(state):
    """Restore a state returned by :func:`get_rng_state`."""
    _generator.bit_generator.state = state
