"""The serving layer: serves any betterproto2 service on grpclib, judging request bytes
exactly as Google's protobuf parser does; nothing here knows NumberService."""
