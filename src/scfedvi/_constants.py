"""Named keys shared across the package (no strings typed twice)."""

from __future__ import annotations

#: Where the latent representation of a site's cells is written.
LATENT_KEY = "X_scFedVI"
#: Keys of ``adata.uns`` written by scfedvi.
UNS_KEY = "scfedvi"

#: A site's private training state after a round (in its state folder; both runtimes).
SITE_STATE_FILE = "{site}.round{round:05d}.pt"

#: Environment variable naming the directory of the real datasets.
DATA_DIR_ENV = "SCFEDVI_DATA_DIR"

#: Payload keys (what a site may send): see ``scfedvi.federation.payload``.
NUM_EXAMPLES = "num-examples"
SCHEMA_HASH = "schema-hash"
