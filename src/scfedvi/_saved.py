"""The saved-model directory that :class:`~scfedvi.model.ScFedVI` and
:class:`~scfedvi.annotate.ScFedANVI` both write and read.

A directory holds the global weights (``model.npz``), the federation schema (``schema.json``),
the run's configuration and the model's own metadata (a JSON file whose name tells the model
kind: ``config.json`` for scFedVI, ``annotate.json`` for scANVI), the training history
(``history.csv``) and the balancing steps (``balance.npz``) with which a new site embeds as the
training sites did.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scfedvi.config import RunConfig
from scfedvi.data.schema import FederationSchema

log = logging.getLogger(__name__)
MODEL_FILE, SCHEMA_FILE, HISTORY_FILE, BALANCE_FILE = (
    "model.npz",
    "schema.json",
    "history.csv",
    "balance.npz",
)


@dataclass
class SavedModel:
    """What :func:`load_model_dir` read: the metadata JSON (``meta['config']`` parsed into
    ``config``), the schema, the weights, the history (``None`` if empty) and the balancing
    steps."""

    meta: dict[str, Any]
    schema: FederationSchema
    config: RunConfig
    params: dict[str, np.ndarray]
    history: pd.DataFrame | None
    balance: list[Any]


def save_model_dir(
    directory: str | os.PathLike,
    *,
    params: Mapping[str, np.ndarray],
    schema: FederationSchema,
    config: RunConfig,
    meta_file: str,
    meta: Mapping[str, Any],
    history: pd.DataFrame,
    balance: list[Any],
    overwrite: bool = False,
) -> Path:
    """Write a model directory; ``meta`` is stored in ``meta_file`` with ``config`` added.

    Raises
    ------
    FileExistsError
        If the directory already holds a model and ``overwrite`` is false.
    """
    from scfedvi.federation.balance import steps_to_arrays

    d = Path(directory)
    if (d / MODEL_FILE).exists() and not overwrite:
        raise FileExistsError(
            f"{d / MODEL_FILE} exists; pass overwrite=True or choose another directory"
        )
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / MODEL_FILE, **params)  # type: ignore[arg-type]
    schema.save(d / SCHEMA_FILE)
    (d / meta_file).write_text(json.dumps({"config": config.to_dict(), **meta}, indent=2))
    history.to_csv(d / HISTORY_FILE, index=False)
    np.savez(d / BALANCE_FILE, **steps_to_arrays(balance))  # type: ignore[arg-type]
    return d


def load_model_dir(directory: str | os.PathLike, *, meta_file: str, kind: str) -> SavedModel:
    """Read a directory written by :func:`save_model_dir`.

    Raises
    ------
    FileNotFoundError
        Naming the directory and the missing file (``kind`` names the model in the message).
    """
    d = Path(directory)
    for name in (MODEL_FILE, meta_file):
        if not (d / name).exists():
            raise FileNotFoundError(f"no saved {kind} model in {d} (missing {name})")
    meta = json.loads((d / meta_file).read_text())
    config = RunConfig.from_dict(meta["config"])
    with np.load(d / MODEL_FILE) as z:
        params = {k: z[k] for k in z.files}
    history = None
    if (d / HISTORY_FILE).exists() and (d / HISTORY_FILE).stat().st_size > 1:
        history = pd.read_csv(d / HISTORY_FILE)
    return SavedModel(
        meta=meta,
        schema=FederationSchema.load(d / SCHEMA_FILE),
        config=config,
        params=params,
        history=history,
        balance=_load_balance(d / BALANCE_FILE, config.balance_clusters),
    )


def _load_balance(path: Path, clusters: int) -> list[Any]:
    from scfedvi.federation.balance import steps_from_arrays

    if not path.exists():
        if clusters:
            log.warning(
                "%s is missing (a model saved before balancing existed): embedding with each "
                "site's own statistics, unbalanced",
                path,
            )
        return []
    with np.load(path) as z:
        return steps_from_arrays({k: z[k] for k in z.files})
