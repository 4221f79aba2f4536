"""The worker's health (grpc.health.v1), for whoever supervises it (`slora up`'s launcher,
a Kubernetes liveness probe): SERVING while its executor thread is not stuck in a step.

A stopped (SIGSTOP) or wedged process answers nothing: the probe times out, which a
supervisor counts as a failure too. A process whose event loop still runs but whose
executor thread has been inside one step for more than `hung_step_s` (a kernel that never
returns) answers NOT_SERVING. The scheduler sees both sooner, from the step's expected
time (scheduler/driver.py), and ends the requests; this is what gets the process restarted.

A supervisor that restarts only a process that exits (compose's `restart:`, systemd) would
leave a hung worker hung, so the worker also ends itself (`exit_after_s`, --hung-step-exit-s):
  * a step running that long: the health loop logs it, writes every thread's stack to
    stderr and exits with EXIT_HUNG;
  * a process whose event loop stops running that long (a thread wedged in C code holding
    the GIL, where no Python runs): a dead man's switch, faulthandler's timer (a C thread,
    no GIL needed), re-armed at every health check, writes the stacks and exits with status 1.
Neither costs a step anything: the timer is re-armed once a second, not per step.
"""
from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import sys
import time

from grpc_health.v1 import health_pb2

from slora.common.lifecycle import HealthServicer
from slora.v1 import worker_pb2

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
CHECK_INTERVAL_S = 1.0
DEFAULT_HUNG_STEP_S = 120.0
DEFAULT_HUNG_STEP_EXIT_S = 300.0
EXIT_HUNG = 3
"""The worker's exit status when a step ran past --hung-step-exit-s."""
NOT_IN_A_STEP = None

log = logging.getLogger(__name__)


class StepWatch:
    """When the executor thread entered the step it is in (written on that thread, read
    on the event loop: one float, no lock needed)."""

    def __init__(self, hung_step_s: float = DEFAULT_HUNG_STEP_S, exit_after_s: float = 0.0):
        self.hung_step_s = hung_step_s
        self.exit_after_s = exit_after_s
        """0: never exit (a supervisor's probe restarts a hung worker)."""
        self.started_at: float | None = NOT_IN_A_STEP

    def begin(self) -> None:
        self.started_at = time.monotonic()

    def end(self) -> None:
        self.started_at = NOT_IN_A_STEP

    def stuck_s(self) -> float:
        """Seconds spent in the current step past `hung_step_s`; <= 0 when not stuck."""
        started_at = self.started_at
        if started_at is NOT_IN_A_STEP:
            return 0.0
        return time.monotonic() - started_at - self.hung_step_s

    def step_s(self) -> float:
        """Seconds spent in the current step; 0 when not in one."""
        started_at = self.started_at
        return 0.0 if started_at is NOT_IN_A_STEP else time.monotonic() - started_at


async def keep_health(servicer: HealthServicer, watch: StepWatch) -> None:
    """Runs until cancelled, setting the health of "" and slora.v1.Worker, and with
    `watch.exit_after_s` ending the process as the module docstring says."""
    status = None
    try:
        while True:
            if watch.exit_after_s > 0:
                exit_if_hung(watch)
                faulthandler.dump_traceback_later(watch.exit_after_s, exit=True)
            now = (health_pb2.HealthCheckResponse.NOT_SERVING if watch.stuck_s() > 0
                   else health_pb2.HealthCheckResponse.SERVING)
            if now != status:
                status = now
                for name in ("", WORKER_SERVICE):
                    await servicer.set(name, status)
            await asyncio.sleep(CHECK_INTERVAL_S)
    finally:
        if watch.exit_after_s > 0:
            faulthandler.cancel_dump_traceback_later()


def exit_if_hung(watch: StepWatch) -> None:
    """Ends the process (EXIT_HUNG) when its step has run `watch.exit_after_s` or longer."""
    step_s = watch.step_s()
    if step_s < watch.exit_after_s:
        return
    log.error("one step has run %.0f s, past --hung-step-exit-s %.0f: the worker is hung; "
              "exiting (status %d) so that its supervisor restarts it; the threads' stacks "
              "follow on stderr", step_s, watch.exit_after_s, EXIT_HUNG)
    for handler in logging.getLogger().handlers:
        handler.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(EXIT_HUNG)
