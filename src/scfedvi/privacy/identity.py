"""Site identity keys and the roster: what authenticates secure aggregation's messages.

Each site owns a long-term Ed25519 signing key (``NAME.key``, PEM, file mode 0600, made by
``scfedvi secagg-keygen``) and a **roster**: the consortium's list of site names and their
public identity keys, a TOML file distributed out of band (never by the coordinator)::

    # scFedVI secure-aggregation roster: site name -> Ed25519 public identity key
    [sites]
    "lab-a" = "ed25519:3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
    "lab-b" = "ed25519:..."

A site names both files in its policy (``SitePolicy.secagg_identity_key`` and
``secagg_roster``; Flower node config ``secagg-identity-key`` and ``secagg-roster``). In secure
aggregation (:mod:`scfedvi.privacy.secagg_protocol`) it signs its advertised public keys and
the survivor set, and verifies every peer's signatures against its own roster: a name that is
not in the roster, a key the roster does not hold, or a signature over another round is
refused. In process, where one program simulates every site, :func:`make_identities` makes
the keys in memory.

Light: :mod:`cryptography` and the standard library.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from scfedvi.data.errors import SiteDataError

__all__ = [
    "SiteIdentity",
    "keygen",
    "load_identity",
    "load_roster",
    "make_identities",
    "public_key_text",
    "signed_bytes",
    "write_roster",
]

#: Prefix of a public identity key as text (``.pub`` files and roster entries).
PREFIX = "ed25519:"
_RAW_PUB = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def signed_bytes(*parts: bytes | str | int) -> bytes:
    """The bytes a site signs: every part length-prefixed (no two lists of parts give the same
    bytes, whatever the site names or salts hold), under a fixed domain tag."""
    out = [b"scfedvi-secagg-signature-v1"]
    for p in parts:
        out.append(
            p.encode() if isinstance(p, str) else str(p).encode() if isinstance(p, int) else p
        )
    return b"".join(len(x).to_bytes(4, "big") + bytes(x) for x in out)


def public_key_text(key: Ed25519PublicKey | bytes) -> str:
    """``ed25519:<64 hex digits>``."""
    raw = key if isinstance(key, bytes) else key.public_bytes(*_RAW_PUB)
    return PREFIX + raw.hex()


def _parse_public(text: str, where: str) -> bytes:
    t = str(text).strip().split()[0] if str(text).strip() else ""
    if not t.startswith(PREFIX):
        raise SiteDataError(f"{where}: {text!r} is not an identity key (expected {PREFIX}<hex>)")
    try:
        raw = bytes.fromhex(t[len(PREFIX) :])
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise SiteDataError(
            f"{where}: {text!r} is not a 32-byte Ed25519 public key in hex"
        ) from None
    return raw


@dataclass(frozen=True)
class SiteIdentity:
    """A site's signing key and the roster it trusts (``{site: raw 32-byte public key}``).

    Raises :class:`~scfedvi.data.errors.SiteDataError` when the roster does not list the site
    with this key (a misconfigured site must not take part)."""

    site: str
    signing_key: Ed25519PrivateKey = field(repr=False)
    roster: Mapping[str, bytes]

    def __post_init__(self) -> None:
        own = self.signing_key.public_key().public_bytes(*_RAW_PUB)
        if self.roster.get(self.site) != own:
            listed = "with another key" if self.site in self.roster else "not at all"
            raise SiteDataError(
                f"site {self.site!r}: its secure-aggregation roster lists it {listed}; add "
                f'"{self.site}" = "{public_key_text(own)}" to the roster (from its .pub file)'
            )

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message)

    def verify(self, peer: str, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` over ``message`` is by the key the roster lists for ``peer``
        (``False`` for a peer the roster does not list)."""
        raw = self.roster.get(peer)
        if raw is None:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(bytes(signature), message)
        except (InvalidSignature, ValueError):
            return False
        return True


def make_identities(sites: Iterable[str]) -> dict[str, SiteIdentity]:
    """In-memory identities for ``sites`` sharing one roster (the in-process runtime, tests)."""
    keys = {s: Ed25519PrivateKey.generate() for s in sites}
    roster = {s: k.public_key().public_bytes(*_RAW_PUB) for s, k in keys.items()}
    return {s: SiteIdentity(s, k, roster) for s, k in keys.items()}


# -- files -------------------------------------------------------------------------------------
def keygen(site: str, out_dir: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``out_dir/SITE.key`` (PEM, mode 0600) and ``out_dir/SITE.pub``; returns both."""
    if not site or any(c in site for c in '/\\"\n') or site.startswith("."):
        raise ValueError(f"site name {site!r}: use letters, digits, '-', '_' or '.'")
    d = Path(out_dir).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = d / f"{site}.key", d / f"{site}.pub"
    if not overwrite and (key_path.exists() or pub_path.exists()):
        raise FileExistsError(
            f"{key_path} exists: a site keeps one identity key (its roster entry names it); "
            "pass --overwrite to replace it and redistribute the roster"
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path.unlink(missing_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_text(f"{public_key_text(key.public_key())} {site}\n", encoding="utf-8")
    return key_path, pub_path


def _load_signing_key(path: Path, site: str) -> Ed25519PrivateKey:
    where = f"site {site!r}: secagg-identity-key {str(path)!r}"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SiteDataError(
            f"{where}: no such file; make one with `scfedvi secagg-keygen --site {site} "
            "--out DIR` and add its .pub line to the consortium's roster"
        ) from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SiteDataError(
            f"{where}: readable by other users (mode {stat.S_IMODE(mode):o}); chmod 600 it"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise SiteDataError(f"{where}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SiteDataError(f"{where}: not an Ed25519 key; make one with scfedvi secagg-keygen")
    return key


def load_roster(path: str | os.PathLike, site: str = "?") -> dict[str, bytes]:
    """The roster file's ``{site: raw public key}`` (a TOML ``[sites]`` table)."""
    p = Path(path).expanduser()
    where = f"site {site!r}: secagg-roster {str(p)!r}"
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteDataError(
            f"{where}: no such file; write the consortium's roster there (see docs/deployment.md)"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise SiteDataError(f"{where}: not valid TOML ({e})") from None
    table = doc.get("sites")
    if not isinstance(table, dict) or not table:
        raise SiteDataError(f'{where}: no [sites] table of site = "{PREFIX}<hex>" entries')
    roster = {str(k): _parse_public(v, f"{where}, site {k!r}") for k, v in table.items()}
    keys = list(roster.values())
    if len(set(keys)) != len(keys):
        raise SiteDataError(f"{where}: two sites share one identity key; each site needs its own")
    return roster


def load_identity(key_path: str | os.PathLike, roster_path: str | os.PathLike, site: str):
    """The site's :class:`SiteIdentity` from its key file and its roster file."""
    key = _load_signing_key(Path(key_path).expanduser(), site)
    return SiteIdentity(site, key, load_roster(roster_path, site))


def write_roster(path: str | os.PathLike, entries: Mapping[str, str | bytes]) -> Path:
    """Write (or extend: existing entries are kept unless named again) a roster file;
    ``entries`` maps site names to public keys (raw bytes or ``ed25519:<hex>``)."""
    p = Path(path).expanduser()
    roster = load_roster(p) if p.exists() else {}
    for s, k in entries.items():
        roster[str(s)] = k if isinstance(k, bytes) else _parse_public(k, f"roster entry {s!r}")
    lines = [
        "# scFedVI secure-aggregation roster: site name -> Ed25519 public identity key",
        "[sites]",
    ]
    lines += [f'"{s}" = "{public_key_text(k)}"' for s, k in sorted(roster.items())]
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p
