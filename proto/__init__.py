"""podwire's contracts: the agent's gRPC API and the WireguardNode resource model."""
