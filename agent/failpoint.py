"""Named points where a test can make the agent die, to prove what a crash there leaves.

A rotation has three steps after which a crash must still recover to one consistent key
(stored, applied to the device, published). The e2e tests start an agent with
PODWIRE_FAILPOINT=<name> and it exits at once, without clean-up, when it reaches that point,
as a killed container would. Unset (always, in a cluster) it does nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Final

ENV: Final = "PODWIRE_FAILPOINT"
EXIT_CODE: Final = 137  # what a SIGKILLed process reports


def reached(name: str) -> None:
    if os.environ.get(ENV) == name:
        sys.stderr.write(f"podwire-agent: failpoint {name} reached, exiting\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
