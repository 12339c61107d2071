"""The lease clock: one that keeps counting while the laptop sleeps, per platform.

A lease granted before a laptop sleeps must have run out when it wakes past its TTL,
so the clock leases run on must count the sleep. Python's ``time.monotonic`` does not
everywhere (on macOS it is ``mach_absolute_time``, which stops during sleep), and the
wall clock can be moved by users and NTP. So each platform gets its own choice:

- Linux: ``CLOCK_BOOTTIME``.
- macOS: ``CLOCK_MONOTONIC`` through ``clock_gettime``, which on macOS counts sleep.
- Windows: ``QueryInterruptTime`` (kernelbase, Windows 10+, 100 ns units, counts
  sleep), else ``GetTickCount64`` (kernel32, milliseconds, counts sleep). Never
  ``QueryUnbiasedInterruptTime``: "unbiased" means sleep is left out.

Anywhere else there is no clock known to count sleep: ``platform_clock`` raises
``NoSleepClock`` saying why, and the agent then never holds a lease (it refuses
ALLOWED with that reason), so it never captures.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import time
from collections.abc import Callable
from typing import Any

Clock = Callable[[], float]
# Opens a Windows DLL by name (tests pass a fake one).
LibraryLoader = Callable[[str], Any]

# Windows clocks' units, in seconds.
HUNDRED_NANOSECONDS = 1e-7
MILLISECONDS = 1e-3


class NoSleepClock(Exception):
    """This platform has no clock known to keep counting while it sleeps."""


def _windows_library(name: str) -> Any:
    if sys.platform == "win32":
        return ctypes.WinDLL(name)
    raise OSError(f"{name}.dll exists only on Windows")


def _clock_gettime(clock_name: str) -> Clock:
    clock_id = getattr(time, clock_name, None)
    if clock_id is None:
        raise NoSleepClock(f"{sys.platform}: time.{clock_name} is not available")
    return functools.partial(time.clock_gettime, clock_id)


def _interrupt_time(load: LibraryLoader) -> Clock:
    query = load("kernelbase").QueryInterruptTime
    query.restype = None
    query.argtypes = [ctypes.POINTER(ctypes.c_ulonglong)]

    def read() -> float:
        ticks = ctypes.c_ulonglong()
        query(ctypes.pointer(ticks))
        return ticks.value * HUNDRED_NANOSECONDS

    return read


def _tick_count(load: LibraryLoader) -> Clock:
    get_tick_count = load("kernel32").GetTickCount64
    get_tick_count.restype = ctypes.c_ulonglong
    get_tick_count.argtypes = []

    def read() -> float:
        return float(get_tick_count()) * MILLISECONDS

    return read


def _windows_clock(load: LibraryLoader) -> Clock:
    problems = []
    sources = {"QueryInterruptTime": _interrupt_time, "GetTickCount64": _tick_count}
    for name, source in sources.items():
        try:
            return source(load)
        except (OSError, AttributeError) as exc:  # no such DLL, or no such function
            problems.append(f"{name}: {exc}")
    raise NoSleepClock(f"win32: no tick count that includes sleep ({'; '.join(problems)})")


def platform_clock(load_library: LibraryLoader = _windows_library) -> Clock:
    """This platform's sleep-counting clock (read ``sys.platform`` now); or NoSleepClock."""
    platform = sys.platform
    if platform.startswith("linux"):
        return _clock_gettime("CLOCK_BOOTTIME")
    if platform == "darwin":
        return _clock_gettime("CLOCK_MONOTONIC")
    if platform == "win32":
        return _windows_clock(load_library)
    raise NoSleepClock(f"{platform}: no clock known to keep counting while the machine sleeps")


def _this_platform() -> Clock | NoSleepClock:
    try:
        return platform_clock()
    except NoSleepClock as exc:
        return exc


# Resolved once: the clock agents run their leases on, or why there is none here.
PLATFORM_CLOCK: Clock | NoSleepClock = _this_platform()
# What Hello.lease_clock says: the server's readiness check flags "none".
NO_SLEEP_CLOCK = "none"
PLATFORM_CLOCK_NAME = (
    NO_SLEEP_CLOCK
    if isinstance(PLATFORM_CLOCK, NoSleepClock)
    else {"linux": "CLOCK_BOOTTIME", "darwin": "CLOCK_MONOTONIC"}.get(
        sys.platform.rstrip("0123456789"), "interrupt time"
    )
)
