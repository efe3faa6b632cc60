"""podwire's cluster operator: removes stale WireguardNodes, flags conflicts, rotates keys.

Installed as podwire.operator; the folder is never importable as the top-level name
`operator`, which would shadow the standard library's module.
"""
