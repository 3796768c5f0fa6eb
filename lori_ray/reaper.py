"""Ends a local Ray cluster within a second of the death of the driver that started it, however it dies.

Ray's head processes are the driver's children. Killed (SIGKILL, the OOM killer), the driver cannot stop them: they
are re-parented to init, and the agents under the raylet kept listening for minutes (they try to flush their logs
to a GCS that is gone). This process, started beside the cluster in a session of its own (``cluster.start_local``),
notes the Ray processes under the driver every few seconds and kills those still running once the driver is gone.
It needs only psutil, so it starts in a fraction of a second.

    python -m lori_ray.reaper DRIVER_PID RAY_PACKAGE_DIR
"""

from __future__ import annotations

import sys
import time

import psutil


def ray_processes(driver: psutil.Process, ray_dir: str) -> dict[int, psutil.Process]:
    """The driver's children started from the Ray package (GCS, raylet, dashboard, monitors), with every process
    under them (agents, workers); other children of the driver are not the cluster's."""
    found = {}
    for child in driver.children():
        try:
            if not any(ray_dir in part for part in child.cmdline()[:2]):
                continue
            for process in [child, *child.children(recursive=True)]:
                found[process.pid] = process
        except psutil.Error:  # gone meanwhile
            continue
    return found


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a killed driver stays one until its parent waits for it)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def reap(driver_pid: int, ray_dir: str, check_s: float = 0.25, look_s: tuple[float, float] = (0.5, 5.0),
         settle_s: float = 30.0) -> int:
    """Wait for the driver to die, then kill the Ray processes seen under it; how many were killed. The driver is
    checked every ``check_s``; the processes under it (a scan of every process: ~10 ms of CPU) are looked for every
    ``look_s[0]`` while the cluster starts (``settle_s``), then every ``look_s[1]``: a worker started since the last
    look ends with the raylet it belongs to."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return 0
    seen: dict[int, psutil.Process] = {}
    started = looked = time.monotonic()
    while alive(driver):
        now = time.monotonic()
        if not seen or now - looked >= look_s[now - started > settle_s]:
            looked = now
            try:
                seen.update(ray_processes(driver, ray_dir))
            except psutil.Error:
                break
        time.sleep(check_s)
    killed = 0
    for process in seen.values():
        try:
            if process.is_running():  # psutil compares the start time too: a reused pid is not this process
                process.kill()
                killed += 1
        except psutil.Error:
            continue
    return killed


if __name__ == "__main__":
    reap(int(sys.argv[1]), sys.argv[2])
