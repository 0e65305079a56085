"""scFedVI as a Flower app: thin glue between Flower messages and :mod:`scfedvi.federation`.

- :mod:`~scfedvi.flower.server_app` and :mod:`~scfedvi.flower.client_app`: the ServerApp
  (coordinator) and the ClientApp (a site), named in ``[tool.flwr.app.components]``;
- :mod:`~scfedvi.flower.setup`: the setup round (harmonization into the schema);
- :mod:`~scfedvi.flower.exchange`: sending messages and collecting replies in time;
- :mod:`~scfedvi.flower.messages`: conversions between parameter dicts and Flower records;
- :mod:`~scfedvi.flower.node`: a site's settings, data and private files;
- :mod:`~scfedvi.flower.settings`: the run config and the app directory.

Nothing is imported here, so that a site's process loads only what a message needs.
"""
