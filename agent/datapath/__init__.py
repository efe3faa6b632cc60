"""The datapath: the WireGuard device the agent programs, its routes, and fail-closed.

One concern per module:

- `backend`: what the control loop asks of a device (the Backend protocol).
- `kernel`: the kernel's WireGuard, over generic netlink.
- `userspace`: podwire-engine (or any userspace WireGuard), over its UAPI socket.
- `uapi`: the UAPI client, spoken exactly as `wg` speaks it.
- `supervisor`: starting the engine as a process that outlives the agent.
- `link`: what both backends do to the link once it exists: MTU, offloads, up.
- `routes`: podwire's routes, the per-peer ones and the fail-closed backstop.
- `select`: the one place that picks a backend for a configuration.
- `component`: the agent's datapath component, which puts these together.

Only the `netlink` package touches the kernel's network stack; these modules speak in the
neutral device model of `wgdevice`.
"""
