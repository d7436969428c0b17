"""Flower apps on the same strategy code: a ServerApp, a ClientApp and the strategy wrapper.

* :mod:`fedalign.flower.messages` converts our objects (parameters, train instructions,
  client results with routing statistics, the run configuration) to and from Flower records;
* :mod:`fedalign.flower.strategy` wraps any :class:`fedalign.strategies.Strategy` as a
  ``flwr.serverapp.strategy.Strategy`` that keeps the strategy state between rounds;
* :mod:`fedalign.flower.server_app` and :mod:`fedalign.flower.client_app` hold the ``app``
  objects named in ``pyproject.toml`` (``[tool.flwr.app.components]``).

Flower is an optional dependency (``pip install "fedalign[flower]"``); importing this
package does not import it.
"""
