"""Cost of secure aggregation per round: bytes and seconds, against the unmasked round.

Two measurements for each federation size in ``--sites`` (default 3, 5, 10):

1. **The protocol alone** on the model's shared parameters (``--genes`` genes, one batch per
   site, the default model): each site's update (random, clipped) is encoded, masked and
   summed through :func:`scfedvi.privacy.secagg_protocol.secure_sum` with every site's
   :class:`SiteSession` in this process. Bytes: every payload each stage carries (keys,
   encrypted shares, the masked ``uint32`` vector, the revealed shares; names and lists
   counted by their bytes), per site, up and down, against the float32 parameters a site sends
   and receives in an unmasked round. Seconds: the whole exchange (all sites' work done one
   after the other, as a single core would) against the unmasked aggregation
   (:func:`~scfedvi.federation.aggregate.fedavg` of the same updates), the anchor; and with
   one site dropping out after sending its shares (its masks recovered from the others'
   shares). The part of both that authenticates the protocol against a malicious
   coordinator is measured in the same run: bytes of the signatures, the signer lists and the
   consistency stage's messages, and seconds spent signing and verifying (Ed25519; the
   sites' long-term identity keys are made once, outside the timing).
2. **A whole in-process round** (``--cells`` cells per site of simulated counts, ``--rounds``
   rounds of one local epoch): seconds per round of ``ScFedVI.train`` with
   ``PrivacyConfig(secure_aggregation=True)`` against the same run without it.

Usage::

    nice -n 10 .venv/bin/python benchmarks/bench_secagg.py [--sites 3 5 10] [--genes 2000]

Prints a markdown table and writes ``benchmark-out/bench_secagg.json`` (``--out``) with the
command, versions, seeds and every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sites", type=int, nargs="+", default=[3, 5, 10])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--cells", type=int, default=200, help="cells per site (whole rounds)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="protocol timings (median)")
    p.add_argument("--no-rounds", action="store_true", help="the protocol only")
    p.add_argument("--out", type=Path, default=Path("benchmark-out/bench_secagg.json"))
    return p.parse_args(argv)


def _nbytes(x: Any) -> int:
    if isinstance(x, np.ndarray):
        return int(x.nbytes)
    if isinstance(x, bytes | str):
        return len(x)
    if isinstance(x, int | float):
        return 8
    if isinstance(x, list | tuple):
        return sum(_nbytes(v) for v in x)
    if isinstance(x, dict):
        return sum(len(k) + _nbytes(v) for k, v in x.items())
    raise TypeError(type(x))


def protocol(n: int, genes: int, repeats: int, drop: str | None = None) -> dict[str, Any]:
    from scfedvi.config import ModelConfig, RunConfig
    from scfedvi.federation.aggregate import SiteUpdate, fedavg
    from scfedvi.federation.coordinator import Coordinator
    from scfedvi.privacy.identity import SiteIdentity, make_identities
    from scfedvi.privacy.secagg import (
        decode_sum,
        encode_update,
        secure_average,
        site_weights,
        vector_length,
    )
    from scfedvi.privacy.secagg_protocol import CONSISTENCY, MASKED, SHARES, secure_sum
    from scfedvi.privacy.secagg_site import SiteSession

    cfg = RunConfig(model=ModelConfig())
    g = Coordinator(genes, n, cfg).params
    rng = np.random.default_rng(SEED)
    clip, cells = 1.0, 1000
    params = []
    for _ in range(n):
        d = {k: rng.normal(size=np.shape(v)) for k, v in g.items()}
        norm = np.sqrt(sum(float(np.sum(x**2)) for x in d.values()))
        params.append({k: (g[k] + 0.5 * clip * d[k] / norm).astype(np.float32) for k in g})
    weights = [site_weights(cells, {i: cells}, n, True) for i in range(n)]
    bound = n * cells
    length = vector_length(g, n)
    up = np.zeros(n)
    down = np.zeros(n)
    auth_up = np.zeros(n)
    auth_down = np.zeros(n)
    seconds, auth_seconds = [], []
    ids = make_identities(f"s{i:02d}" for i in range(n))  # long-term keys: made once
    clock = [0.0]
    sign, verify = SiteIdentity.sign, SiteIdentity.verify

    def timed(f):
        def g(*a):
            t = time.perf_counter()
            try:
                return f(*a)
            finally:
                clock[0] += time.perf_counter() - t

        return g

    SiteIdentity.sign, SiteIdentity.verify = timed(sign), timed(verify)  # type: ignore[method-assign]

    def auth_bytes(stage: str, payload: dict) -> int:
        """Bytes that authenticate: signatures, signer lists, the consistency stage."""
        if stage == CONSISTENCY:
            return _nbytes(payload)
        return sum(_nbytes({k: v}) for k, v in payload.items() if k in ("sig", "sigs", "signers"))

    for rep in range(repeats):
        clock[0] = 0.0
        t0 = time.perf_counter()
        vecs = {
            f"s{i:02d}": encode_update(
                params[i], g, weights[i], batch_owned={}, clip_norm=clip, bound=bound
            )
            for i in range(n)
        }
        sessions = {s: SiteSession(s, b"bench", rep, ids[s]) for s in vecs}
        keys = {s: x.keys() for s, x in sessions.items()}
        if rep == 0:
            for i, s in enumerate(vecs):
                up[i] += _nbytes(keys[s])
                auth_up[i] += auth_bytes("keys", keys[s])

        def ask(stage, payloads, rep=rep, sessions=sessions, vecs=vecs):
            out = {}
            for s, p in payloads.items():
                if drop is not None and s == drop and stage != SHARES:
                    continue
                if stage == SHARES:
                    out[s] = sessions[s].shares(p)
                elif stage == MASKED:
                    out[s] = {"masked": sessions[s].masked(vecs[s], p)}
                elif stage == CONSISTENCY:
                    out[s] = sessions[s].consistency(p)
                else:
                    out[s] = sessions[s].unmask(p)
                if rep == 0:
                    k = int(s[1:])
                    down[k] += _nbytes(p)
                    up[k] += _nbytes(out[s])
                    auth_down[k] += auth_bytes(stage, p)
                    auth_up[k] += auth_bytes(stage, out[s])
            return out

        res = secure_sum(ask, keys, length=length, run_id=b"bench", round_idx=rep)
        sums, counts = decode_sum(res.total, g, n, clip_norm=clip, bound=bound)
        secure_average(sums, counts, g, {})
        seconds.append(time.perf_counter() - t0)
        auth_seconds.append(clock[0])
    SiteIdentity.sign, SiteIdentity.verify = sign, verify  # type: ignore[method-assign]
    updates = [SiteUpdate(f"s{i:02d}", params[i], cells, {i: cells}) for i in range(n)]
    plain = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fedavg(updates, g)
        plain.append(time.perf_counter() - t0)
    param_bytes = sum(int(np.asarray(v).nbytes) for v in g.values())
    return {
        "sites": n,
        "dropped": drop,
        "vector_length": length,
        "plain_bytes_up_per_site": param_bytes,
        "secure_bytes_up_per_site": float(np.max(up)),
        "secure_bytes_down_per_site": float(np.max(down)),
        "auth_bytes_up_per_site": float(np.max(auth_up)),
        "auth_bytes_down_per_site": float(np.max(auth_down)),
        "plain_seconds": float(np.median(plain)),
        "secure_seconds": float(np.median(seconds)),
        "auth_seconds": float(np.median(auth_seconds)),
    }


def whole_rounds(n: int, cells: int, genes: int, rounds: int) -> dict[str, Any]:
    from scfedvi import ScFedVI
    from scfedvi.config import FederationConfig, PrivacyConfig, RunConfig, TrainConfig
    from scfedvi.data.simulate import simulate

    adata = simulate(n * cells, genes, n_batches=n, seed=SEED, n_jobs=1)
    b = adata.obs["batch"].astype(str).to_numpy()
    sites = {f"site-{i}": adata[b == f"batch-{i}"].copy() for i in range(n)}  # one batch each
    out: dict[str, Any] = {}
    for name, priv in (
        ("warmup", PrivacyConfig()),  # torch's first steps in this process; not reported
        ("plain", PrivacyConfig()),
        (
            "secure",
            PrivacyConfig(
                clip_norm=100.0, clip_at="site", expected_sites=n, secure_aggregation=True
            ),
        ),
    ):
        cfg = RunConfig(
            train=TrainConfig(local_epochs=1),
            federation=FederationConfig(n_rounds=rounds, seed=SEED, n_jobs=1),
            privacy=priv,
        )
        best = float("inf")
        for _ in range(1 if name == "warmup" else 2):  # the faster of two runs
            model = ScFedVI.from_sites(sites, batch_key="batch", n_top_genes=None, config=cfg)
            t0 = time.perf_counter()
            model.train(progress=False)
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_seconds_per_round"] = best / rounds
        out[f"{name}_params"] = model.params
    diff = max(
        float(np.abs(out["secure_params"][k] - out["plain_params"][k]).max())
        for k in out["plain_params"]
    )
    del out["secure_params"], out["plain_params"], out["warmup_params"]
    del out["warmup_seconds_per_round"]
    return {"sites": n, **out, "max_param_difference": diff}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import cryptography
    import torch

    import scfedvi

    meta = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "load_average_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cryptography": cryptography.__version__,
        "scfedvi": scfedvi.__version__,
        "seed": SEED,
        "cpu": platform.processor() or platform.machine(),
    }
    torch.set_num_threads(1)
    print(json.dumps(meta, indent=1))
    rows, rounds = [], []
    for n in args.sites:
        rows.append(protocol(n, args.genes, args.repeats))
        rows.append(protocol(n, args.genes, args.repeats, drop="s01"))
        if not args.no_rounds:
            rounds.append(whole_rounds(n, args.cells, min(args.genes, 500), args.rounds))
    print(
        "\n| sites | dropout | vector | bytes up/site (plain -> secure, ratio) | "
        "extra bytes down/site (stages 2-5) | aggregation s (plain -> secure, ratio) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['sites']} | {r['dropped'] or '-'} | {r['vector_length']:,} | "
            f"{r['plain_bytes_up_per_site']:,} -> {r['secure_bytes_up_per_site']:,.0f} "
            f"({r['secure_bytes_up_per_site'] / r['plain_bytes_up_per_site']:.3f}x) | "
            f"{r['secure_bytes_down_per_site']:,.0f} | {r['plain_seconds']:.4f} -> "
            f"{r['secure_seconds']:.3f} ({r['secure_seconds'] / r['plain_seconds']:.0f}x) |"
        )
    print(
        "\n| sites | dropout | authentication bytes up/down per site (share of the secure "
        "bytes) | signing + verifying s (share of the secure s) |"
    )
    print("|---|---|---|---|")
    for r in rows:
        total = r["secure_bytes_up_per_site"] + r["secure_bytes_down_per_site"]
        auth = r["auth_bytes_up_per_site"] + r["auth_bytes_down_per_site"]
        print(
            f"| {r['sites']} | {r['dropped'] or '-'} | {r['auth_bytes_up_per_site']:,.0f} / "
            f"{r['auth_bytes_down_per_site']:,.0f} ({auth / total:.5%}) | "
            f"{r['auth_seconds']:.4f} ({r['auth_seconds'] / r['secure_seconds']:.2%}) |"
        )
    print("\n| sites | s/round plain | s/round secure | ratio | max param difference |")
    print("|---|---|---|---|---|")
    for r in rounds:
        print(
            f"| {r['sites']} | {r['plain_seconds_per_round']:.2f} | "
            f"{r['secure_seconds_per_round']:.2f} | "
            f"{r['secure_seconds_per_round'] / r['plain_seconds_per_round']:.2f}x | "
            f"{r['max_param_difference']:.1e} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta["load_average_at_end"] = list(os.getloadavg())
    args.out.write_text(json.dumps({**meta, "protocol": rows, "rounds": rounds}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
