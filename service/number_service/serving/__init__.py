"""The serving layer: serves any betterproto2 service on grpclib, ready for production.

Nothing here knows NumberService: the package around it (``number_service``) uses this
layer, never the other way round. What grpclib lacks and a production server needs
lives here: batched reads and coalesced writes per stream, limits, a graceful drain,
stream tracking, metrics, logs, health and reflection, TLS and workers. Every use of
grpclib's and h2's private attributes is in :mod:`.grpclib_ext`.
"""
