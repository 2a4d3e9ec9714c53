"""Open-file limit: every client and upstream connection is a descriptor."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# Below this, a worker serving thousands of clients runs out of descriptors.
LOW_NOFILE = 16384


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-files limit from %d: %s", soft, error)
    if soft < LOW_NOFILE:
        log.warning(
            "open-files limit is %d: each client and upstream connection needs one; "
            "raise it (LimitNOFILE= in the systemd unit, ulimit -n) for many clients",
            soft,
        )
    else:
        log.info("open-files limit is %d", soft)
    return soft
