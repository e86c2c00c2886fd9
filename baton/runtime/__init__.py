"""The small runtime every baton service shares: settings, logging, errors, the gRPC bootstrap and metrics."""
