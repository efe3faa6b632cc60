"""Everything the agent asks of the kernel's network stack, one concern per module.

This package is the only code that imports pyroute2 (an import-linter contract says so), so the
rest of the agent speaks in ipaddress networks, the device model of `podwire.agent.wgdevice` and
plain values, and tests can fake one small surface. Every call takes `netns`: the name of a
network namespace to work in (None: the agent's own), so the sandbox and the tests can program
a node's namespace from outside it.

- `core`: the errors every call raises (`NetlinkError`, `KernelWireguardUnavailable`) and the
  internals the other modules share: the rtnetlink socket that never creates a namespace, the
  translation of pyroute2's errors, the ifindex lookup.
- `links`: a link's existence, index, MTU, state and addresses; deleting it.
- `underlay`: the link the node's traffic leaves by, which bounds the tunnel's MTU.
- `routes`: podwire's routes through the device and the fail-closed routes.
- `wireguard`: the kernel's WireGuard over generic netlink: create, configure, read back.
- `offloads`: GRO and BIG TCP sizes on the device, and the report of what was applied.
- `ethtool`: UDP GRO forwarding on the underlay, the one feature only ethtool switches.
"""
