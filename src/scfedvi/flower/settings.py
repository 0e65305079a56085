"""The Flower app's settings: the run config (kebab-case) <-> :class:`~scfedvi.config.RunConfig`.

Every field of the model, training, federation and privacy configurations is a run-config key
of the same name in kebab-case (``n_latent`` -> ``n-latent``); ``num-server-rounds`` is
``FederationConfig.n_rounds``. ``None`` fields are written as ``0`` (``local-steps``,
``clip-norm``). The other keys (:class:`AppSettings`) say where data and results are and how
long the server waits. Keys missing from the app's ``pyproject.toml`` take their defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scfedvi.config import (
    AnnotateConfig,
    FederationConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    TrainConfig,
)

_SECTIONS = {
    "model": ModelConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "privacy": PrivacyConfig,
}
_ALIASES = {"n_rounds": "num-server-rounds"}
#: The scANVI stage's settings (:class:`~scfedvi.config.AnnotateConfig`) are run-config keys
#: with this prefix (``local_epochs`` -> ``annotate-local-epochs``; ``n_rounds`` ->
#: ``annotate-num-server-rounds``, as scFedVI's).
ANNOTATE_PREFIX = "annotate-"


def _key(field_name: str) -> str:
    return _ALIASES.get(field_name, field_name.replace("_", "-"))


@dataclass(frozen=True)
class AppSettings:
    """Run-config keys that are not part of :class:`~scfedvi.config.RunConfig`.

    Parameters
    ----------
    out_dir
        The server's output folder: checkpoint, global model, schema, history, result.
    batch_key, label_key, layer
        The federation's batch column, optional label column and raw-count layer (``""``:
        none / ``X``). A site may name its own columns in its node config.
    n_top_genes
        Highly variable genes (seurat_v3 over the sites' summaries); 0 keeps all.
    min_sites_per_gene
        Keep genes measured at this many sites (0: at every site).
    num_sites
        Sites to wait for before the setup round (0: ``min-sites``).
    wait_timeout, setup_timeout, round_timeout
        Seconds to wait for the sites to connect, for a setup reply, for a training reply.
    payload_log
        If set, a JSON-lines file where the server describes every reply it receives.
    sim_data_dir
        Simulation engine: folder of ``<site>.h5ad`` files; node ``partition-id`` picks one
        (sorted by name).
    sim_state_dir
        Simulation engine: folder of the sites' private state (default: ``<out-dir>/sites``).
    annotate_from, annotate_label_key
        With ``annotate-from`` (a trained run's ``model`` folder, as ``scfedvi annotate
        --model``) the run is federated scANVI on that model with the label column
        ``annotate-label-key`` (:mod:`scfedvi.flower.annotate`; its settings: the
        ``annotate-*`` keys of :class:`~scfedvi.config.AnnotateConfig`); each site's policy
        must allow the column.
    """

    out_dir: str = "scfedvi-flower-out"
    batch_key: str = "batch"
    label_key: str = ""
    layer: str = ""
    n_top_genes: int = 2000
    min_sites_per_gene: int = 0
    num_sites: int = 0
    wait_timeout: float = 120.0
    setup_timeout: float = 300.0
    round_timeout: float = 3600.0
    payload_log: str = ""
    sim_data_dir: str = ""
    sim_state_dir: str = ""
    annotate_from: str = ""
    annotate_label_key: str = ""

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir).expanduser().resolve()


def _coerce(value: Any, type_name: str, key: str) -> Any:
    optional = "None" in type_name
    if optional and value in (0, 0.0, ""):
        return None
    base = type_name.replace("| None", "").strip()
    if base == "bool":
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes")
        return bool(value)
    if base == "int":
        return int(value)
    if base == "float":
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"run config {key!r}: expected a string, got {value!r}")
    return value


def _load(cls: type, run_config: Mapping[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = _key(f.name)
        if key in run_config:
            kwargs[f.name] = _coerce(run_config[key], str(f.type), key)
    return cls(**kwargs)


def run_config_from_flower(run_config: Mapping[str, Any]) -> tuple[RunConfig, AppSettings]:
    """Parse Flower's run config into the typed configurations."""
    parts = {name: _load(cls, run_config) for name, cls in _SECTIONS.items()}
    return RunConfig(**parts), _load(AppSettings, run_config)


def annotate_from_flower(run_config: Mapping[str, Any]) -> AnnotateConfig:
    """The scANVI stage's settings from the ``annotate-*`` run-config keys."""
    n = len(ANNOTATE_PREFIX)
    own = {
        k[n:]: v
        for k, v in run_config.items()
        if k.startswith(ANNOTATE_PREFIX) and k not in ("annotate-label-key", "annotate-from")
    }
    return _load(AnnotateConfig, own)


def _flat(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if v is None:  # Flower's config has no null: 0 / 0.0 / "" stand for None
            t = str(f.type)
            v = 0.0 if "float" in t else 0 if "int" in t else ""
        out[_key(f.name)] = v
    return out


def default_run_config(**overrides: Any) -> dict[str, Any]:
    """Every run-config key with its default (for ``[tool.flwr.app.config]``)."""
    cfg = RunConfig()
    out: dict[str, Any] = {}
    for name in _SECTIONS:
        out.update(_flat(getattr(cfg, name)))
    out.update(_flat(AppSettings()))
    out.update({ANNOTATE_PREFIX + k: v for k, v in _flat(AnnotateConfig()).items()})
    for k, v in overrides.items():
        key = k.replace("_", "-")
        if key not in out:
            raise KeyError(f"unknown run-config key {key!r}; known: {sorted(out)}")
        out[key] = v
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def app_pyproject(name: str = "scfedvi-app", **overrides: Any) -> str:
    """A minimal ``pyproject.toml`` for a Flower app directory using the installed scfedvi.

    ``flwr run DIR`` builds the app bundle from ``DIR``; the components point at the
    installed :mod:`scfedvi.flower` modules, so the directory needs nothing else.
    """
    lines = [
        "[project]",
        f'name = "{name}"',
        'version = "0.1.0"',
        'description = "scFedVI: federated scVI across sites (Flower app)"',
        'license = "BSD-3-Clause"',
        "",
        "[tool.flwr.app]",
        'publisher = "scfedvi"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "scfedvi.flower.server_app:app"',
        'clientapp = "scfedvi.flower.client_app:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in default_run_config(**overrides).items()]
    return "\n".join(lines) + "\n"


def write_app_dir(directory: str | Path, **overrides: Any) -> Path:
    """Write :func:`app_pyproject` into ``directory`` (created) and return it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "pyproject.toml").write_text(app_pyproject(**overrides), encoding="utf-8")
    return d


#: The section of a ``pyproject.toml`` that holds the Flower app's run config.
CONFIG_HEADER = "[tool.flwr.app.config]"


def config_section(**overrides: Any) -> str:
    """``[tool.flwr.app.config]`` with every run-config key and its default, as TOML."""
    lines = [CONFIG_HEADER]
    lines += [f"{k} = {_toml_value(v)}" for k, v in default_run_config(**overrides).items()]
    return "\n".join(lines) + "\n"


def rewrite_config_section(path: str | Path) -> bool:
    """Replace ``path``'s ``[tool.flwr.app.config]`` by :func:`config_section`.

    The section runs from its header to the next table header (or the end of the file); the
    rest of the file is left as it is. Returns whether the file changed.

    Raises
    ------
    ValueError
        When the file has no such section.
    """
    import re

    p = Path(path)
    text = p.read_text(encoding="utf-8")
    start = text.find(CONFIG_HEADER + "\n")
    if start < 0:
        raise ValueError(f"{p} has no {CONFIG_HEADER} section; add the header line first")
    nxt = re.compile(r"^\[", re.M).search(text, start + len(CONFIG_HEADER))
    end = nxt.start() if nxt else len(text)
    new = text[:start] + config_section() + ("\n" if nxt else "") + text[end:]
    if new == text:
        return False
    p.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m scfedvi.flower.settings [--write PYPROJECT]``: print or rewrite the section.

    Without ``--write`` the section is printed; ``--write pyproject.toml`` regenerates the root
    project's Flower app config from :class:`~scfedvi.config.RunConfig` (``make flwr-config``).
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m scfedvi.flower.settings")
    parser.add_argument("--write", metavar="PYPROJECT", help="rewrite this file's section")
    args = parser.parse_args(argv)
    if args.write is None:
        print(config_section(), end="")
        return 0
    changed = rewrite_config_section(args.write)
    print(f"{args.write}: {CONFIG_HEADER} {'regenerated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
