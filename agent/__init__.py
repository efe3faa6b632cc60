"""podwire's node agent: one per node, it owns the WireGuard device and programs its peers."""
