"""podwire's userspace WireGuard engine, run as its own process (`podwire-engine`)."""
