"""How many intra-op threads torch uses for small models, chosen here so that examples, the CLI and benchmarks
do not each guess.

torch defaults to one thread per physical core. For the small models of the demo, the examples and the tests,
each matmul is too small to split: on a shared or busy machine the extra threads only wait for cores others use
(`hf-dgate demo --steps 60` on a 2-core machine at load 3.5-7: 13.6 s with 1 thread, 63.9 s with 2). So, unless
the user chose (OMP_NUM_THREADS, MKL_NUM_THREADS or an explicit `--threads`), use the cores that are idle now,
at least 1 and at most `cap`.
"""

from __future__ import annotations

import os

USER_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(cap: int = 4) -> int:
    """min(cap, cores, idle cores), at least 1; idle = cores minus the 1-minute load average."""
    cores = available_cores()
    try:
        idle = int(cores - os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average (Windows): assume idle
        idle = cores
    return max(1, min(cap, cores, idle))


def configure_threads(requested: int | None = None, cap: int = 4) -> tuple[int, str]:
    """Set torch's intra-op threads: `requested` if given, else leave a user's OMP_NUM_THREADS/MKL_NUM_THREADS
    alone, else `default_threads(cap)`. Returns (threads, why) so that timings can state their setting."""
    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads={requested} is invalid: pass an int >= 1.")
        torch.set_num_threads(requested)
        return requested, "requested"
    for name in USER_VARIABLES:
        if os.environ.get(name):
            return torch.get_num_threads(), f"{name}={os.environ[name]}"
    n = default_threads(cap)
    torch.set_num_threads(n)
    return n, f"hf_dgate default: min({cap}, cores, idle cores)"


def describe_threads() -> str:
    """'N torch threads on M cores' for result files and printed timings."""
    import torch

    return f"{torch.get_num_threads()} torch threads on {available_cores()} cores"


THREADS_HELP = (
    "torch intra-op threads (None: OMP_NUM_THREADS if set, else min(4, cores, idle cores); small models run slower "
    "with more threads on a busy machine)"
)
