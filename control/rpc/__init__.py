"""gRPC adapters: translate between the wire protocol and the control plane."""
