"""Site identity keys and rosters: the files, the checks on them, the policy keys and the CLI."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest

from scfedvi.cli import main
from scfedvi.config import SitePolicy
from scfedvi.data.errors import SiteDataError
from scfedvi.federation.secure_round import site_identities
from scfedvi.privacy.identity import keygen, load_identity, load_roster, write_roster
from scfedvi.privacy.policy import policy_from_node_config


def _site(tmp_path, name: str, roster=None):
    key, pub = keygen(name, tmp_path / "keys")
    roster = roster or tmp_path / "roster.toml"
    write_roster(roster, {name: pub.read_text().split()[0]})
    return key, roster


def test_keygen_writes_a_private_key_only_the_owner_reads_and_a_roster_line(tmp_path):
    key, roster = _site(tmp_path, "lab-a")
    _site(tmp_path, "lab-b", roster)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert sorted(load_roster(roster)) == ["lab-a", "lab-b"]
    a = load_identity(key, roster, "lab-a")
    msg = b"round 3 keys"
    assert a.verify("lab-a", msg, a.sign(msg))
    assert not a.verify("lab-b", msg, a.sign(msg))  # lab-a's signature is not lab-b's
    assert not a.verify("lab-z", msg, a.sign(msg))  # nor a site the roster does not list
    with pytest.raises(FileExistsError, match="--overwrite"):
        keygen("lab-a", tmp_path / "keys")


def test_misconfigured_identities_are_refused_with_the_fix(tmp_path):
    key, roster = _site(tmp_path, "lab-a")
    other, _ = _site(tmp_path, "lab-b", tmp_path / "other.toml")
    with pytest.raises(SiteDataError, match=r'lists it not at all.*add "lab-b"'):
        load_identity(other, roster, "lab-b")
    write_roster(roster, {"lab-b": load_roster(tmp_path / "other.toml")["lab-b"]})
    with pytest.raises(SiteDataError, match="lists it with another key"):
        load_identity(key, roster, "lab-b")  # lab-a's key file named as lab-b's
    if os.name == "posix":
        key.chmod(0o644)
        with pytest.raises(SiteDataError, match="chmod 600"):
            load_identity(key, roster, "lab-a")
        key.chmod(0o600)
    with pytest.raises(SiteDataError, match="secagg-keygen --site lab-c"):
        load_identity(tmp_path / "missing.key", roster, "lab-c")
    bad = tmp_path / "bad.toml"
    bad.write_text('[sites]\n"lab-a" = "ssh-ed25519 AAAA"\n')
    with pytest.raises(SiteDataError, match="not an identity key"):
        load_roster(bad)
    a = load_roster(roster)["lab-a"].hex()
    bad.write_text(f'[sites]\n"x" = "ed25519:{a}"\n"y" = "ed25519:{a}"\n')
    with pytest.raises(SiteDataError, match="share one identity key"):
        load_roster(bad)


def test_the_policy_names_both_files_from_its_node_config(tmp_path):
    key, roster = _site(tmp_path, "lab-a")
    pol = policy_from_node_config({"secagg-identity-key": str(key), "secagg-roster": str(roster)})
    assert pol.secagg_identity_key == str(key) and pol.secagg_roster == str(roster)
    with pytest.raises(SiteDataError, match="go together"):
        policy_from_node_config({"secagg-identity-key": str(key)})


def test_in_process_sites_use_their_files_or_keys_made_in_memory(tmp_path):
    roster = tmp_path / "roster.toml"
    files = {s: _site(tmp_path, s, roster)[0] for s in ("a", "b", "c")}

    def sites(with_files):
        pol = {
            s: SitePolicy(secagg_identity_key=str(k), secagg_roster=str(roster))
            if s in with_files
            else SitePolicy()
            for s, k in files.items()
        }
        return [SimpleNamespace(name=s, policy=p) for s, p in pol.items()]

    loaded = site_identities(sites({"a", "b", "c"}))
    assert loaded["a"].roster == load_roster(roster)
    made = site_identities(sites(set()))
    assert set(made["a"].roster) == {"a", "b", "c"} and made["a"].roster != loaded["a"].roster
    with pytest.raises(ValueError, match=r"sites \['c'\] name no identity key"):
        site_identities(sites({"a", "b"}))


def test_cli_keygen_adds_the_site_to_a_roster(tmp_path, capsys):
    roster = tmp_path / "roster.toml"
    for s in ("lab-a", "lab-b"):
        assert (
            main(["secagg-keygen", "--site", s, "--out", str(tmp_path), "--roster", str(roster)])
            == 0
        )
    assert "secagg-identity-key=" in capsys.readouterr().out
    assert sorted(load_roster(roster)) == ["lab-a", "lab-b"]
    assert main(["secagg-keygen", "--site", "lab-a", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_secure_aggregation_states_its_requirements(tmp_path, capsys, small_adata):
    p = tmp_path / "pooled.h5ad"
    small_adata.obs["lab"] = ["x", "y"] * (small_adata.n_obs // 2)
    small_adata.write_h5ad(p)
    base = ["train", "--input", str(p), "--split-key", "lab", "--batch-key", "batch"]
    base += ["--out", str(tmp_path / "out"), "--secure-aggregation"]
    assert main(base) == 2
    assert "--secure-aggregation needs --dp-clip C" in capsys.readouterr().err
    assert main([*base, "--dp-clip", "1.0"]) == 2
    assert "needs at least 3 sites, got 2" in capsys.readouterr().err


def test_cli_secure_aggregation_makes_the_site_clipped_secure_config():
    from argparse import Namespace

    from scfedvi.commands import _privacy

    args = Namespace(secure_aggregation=True, dp_clip=0.5, dp_noise=0.0)
    priv = _privacy(args, 3)
    assert priv.secure_aggregation and priv.clip_at == "site" and priv.clip_norm == 0.5
    assert priv.noise_multiplier == 0.0 and priv.expected_sites == 3


def test_in_process_run_with_identity_files_in_each_sites_policy(tmp_path, small_adata):
    """``ScFedVI``'s ``policy`` names each site's key and roster; a site whose roster lacks a
    peer refuses the round, naming it."""
    from scfedvi import ScFedVI
    from scfedvi.config import FederationConfig, ModelConfig, PrivacyConfig, RunConfig, TrainConfig
    from scfedvi.privacy.policy import PolicyRefusal

    roster, partial = tmp_path / "roster.toml", tmp_path / "partial.toml"
    keys = {s: _site(tmp_path, s, roster)[0] for s in ("a", "b", "c")}
    write_roster(partial, {s: load_roster(roster)[s] for s in ("a", "b")})
    priv = PrivacyConfig(clip_norm=1e3, clip_at="site", expected_sites=3, secure_aggregation=True)
    cfg = RunConfig(
        model=ModelConfig(n_hidden=16, n_latent=3),
        train=TrainConfig(batch_size=32, local_epochs=1),
        federation=FederationConfig(n_rounds=1),
        privacy=priv,
    )
    n = small_adata.n_obs // 3
    sites = {s: small_adata[i * n : (i + 1) * n].copy() for i, s in enumerate(keys)}

    def policies(roster_of):
        return {
            s: SitePolicy(secagg_identity_key=str(k), secagg_roster=str(roster_of(s)))
            for s, k in keys.items()
        }

    model = ScFedVI.from_sites(
        sites, batch_key="batch", n_top_genes=None, config=cfg, policy=policies(lambda s: roster)
    )
    h = model.train(progress=False)
    assert (h[h["site"] != "(server)"]["status"] == "ok").all()
    model = ScFedVI.from_sites(
        sites,
        batch_key="batch",
        n_top_genes=None,
        config=cfg,
        policy=policies(lambda s: partial if s == "a" else roster),
    )
    with pytest.raises(PolicyRefusal, match=r"site 'a' refuses.*\['c'\] are not in its roster"):
        model.train(progress=False)
