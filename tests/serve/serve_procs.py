"""Processes of a `thunderkv serve` process group, for the serve CLI and operations tests."""

from __future__ import annotations

import time
from pathlib import Path


def processes_in_group(pgid: int) -> list[str]:
    """Processes (not zombies) of process group ``pgid``: 'pid command' each."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        comm_end = stat.rindex(")")
        fields = stat[comm_end + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(f"{d.name} {stat[stat.index('(') + 1:comm_end]}")
    return found


def wait_group_empty(pgid: int, timeout: float = 15.0) -> list[str]:
    """What is left of group ``pgid`` once it emptied or ``timeout`` s passed."""
    deadline = time.monotonic() + timeout
    while (left := processes_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
