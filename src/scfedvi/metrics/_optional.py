"""Optional dependencies of the metrics, imported on first use with a clear message."""

from __future__ import annotations

from types import ModuleType

_EXTRA_HINT = "install the benchmark extra: pip install 'scfedvi[benchmark]'"


def import_scib_metrics() -> ModuleType:
    """Import scib-metrics (and jax), or raise an ImportError that names the extra.

    Returns
    -------
    module
        The ``scib_metrics`` module. The first import takes several seconds (jax).
    """
    try:
        import scib_metrics
    except ImportError as err:
        raise ImportError(f"scib-metrics is required for this function; {_EXTRA_HINT}") from err
    return scib_metrics
