"""Connectors between statefun_mesh and external systems.

- :mod:`statefun_mesh.connectors.nats`: a NATS JetStream ingress (``statefun-mesh nats-ingress``).

Each connector imports its client library lazily, so ``import statefun_mesh`` never needs it;
install it with the connector's extra (``pip install 'statefun-mesh[nats]'``).
"""
