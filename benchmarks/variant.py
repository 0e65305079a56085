"""Run `scfedvi benchmark` with one more scFedVI method, defined by configuration overrides.

The probes of the README's "Why a LayerNorm decoder" were run this way: the variant is
registered as ``x-TAG`` (its settings, and so its cache key, include the overrides), every
other argument goes to ``scfedvi benchmark``. ``_schedule: [rounds, local_epochs, warmup]``
replaces the benchmark's schedule for the variant.

Examples::

    python benchmarks/variant.py bn-decoder '{"model": {"decoder_norm": "batch"}}' \\
        cortex --clients 2,3,5 --seeds 0 --out bench-variants
    python benchmarks/variant.py fedavgm '{"federation": {"server_optimizer": "fedavgm",
        "server_momentum": 0.5}}' cortex --clients 2,5 --out bench-variants
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    tag, overrides = argv[0], json.loads(argv[1])
    import torch

    torch.set_num_threads(1)  # one thread per job, as the benchmark's workers
    from scfedvi.benchmark import methods as m
    from scfedvi.cli import main as cli

    schedule = overrides.pop("_schedule", None)
    settings = m.scfedvi_settings(overrides, schedule=tuple(schedule) if schedule else None)
    name = f"x-{tag}"
    m.METHODS[name] = m.Method(name, name, "federated", settings, m.run_scfedvi)
    return cli(["benchmark", *argv[2:], "--methods", name, "--jobs", "1"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
