"""The release-CPU throttle: sleep a fixed time per MB read, so a sync leaves CPU to others."""

from __future__ import annotations

import time

MB = 1024 * 1024


class Throttle:
    """[period] vmware_release_cpu_time / openstack_release_cpu_time: ms slept per MB read."""

    def __init__(self, ms_per_mb: int) -> None:
        self.ms_per_mb = ms_per_mb
        self._owed_s = 0.0

    def after_read(self, nbytes: int) -> None:
        if self.ms_per_mb <= 0:
            return
        self._owed_s += nbytes / MB * self.ms_per_mb / 1000
        # Sleep in slices of at least 10 ms: shorter sleeps cost more than they release.
        if self._owed_s >= 0.01:
            time.sleep(self._owed_s)
            self._owed_s = 0.0
