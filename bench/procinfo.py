"""Resident memory and process trees, read from /proc."""

from __future__ import annotations

import os


def _stat(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat fields from the state on (index 0 = state), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    return stat[stat.rfind(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Direct children of `pid`."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(entry)) and int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot): with the pid, names one
    process even after pids are reused. None if it is gone."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def rss(pid: int) -> int:
    """Resident set size of `pid` in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for {pid}")


def pids_named(name: str) -> list[int]:
    """Processes whose command name is `name` (e.g. the broker's beam.smp)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm", encoding="ascii", errors="replace") as handle:
                if handle.read().strip() == name:
                    found.append(int(entry))
        except OSError:
            continue
    return found


def total_rss(pids: list[int]) -> int:
    return sum(rss(pid) for pid in pids)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time used so far by `pids` (gone ones count 0)."""
    ticks = 0
    for pid in pids:
        if fields := _stat(pid):
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def open_files_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of `pid`."""
    with open(f"/proc/{pid}/limits", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise ValueError(f"no open files limit for {pid}")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
