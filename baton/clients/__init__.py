"""Typed clients of baton's services: ``embedder`` (gRPC) and ``gateway`` (HTTP). Import the module you need;
nothing is imported here, so that a gateway client does not pull in gRPC stubs and the other way round."""
