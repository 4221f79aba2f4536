"""The worker's health (grpc.health.v1), for whoever supervises it (`slora up`'s launcher,
a Kubernetes liveness probe): SERVING while its executor thread is not stuck in a step.

A stopped (SIGSTOP) or wedged process answers nothing: the probe times out, which a
supervisor counts as a failure too. A process whose event loop still runs but whose
executor thread has been inside one step for more than `hung_step_s` (a kernel that never
returns) answers NOT_SERVING. The scheduler sees both sooner, from the step's expected
time (scheduler/driver.py), and ends the requests; this is what gets the process restarted.
"""
from __future__ import annotations

import asyncio
import time

from grpc_health.v1 import health_pb2

from slora.common.lifecycle import HealthServicer
from slora.v1 import worker_pb2

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
CHECK_INTERVAL_S = 1.0
DEFAULT_HUNG_STEP_S = 120.0
NOT_IN_A_STEP = None


class StepWatch:
    """When the executor thread entered the step it is in (written on that thread, read
    on the event loop: one float, no lock needed)."""

    def __init__(self, hung_step_s: float = DEFAULT_HUNG_STEP_S):
        self.hung_step_s = hung_step_s
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


async def keep_health(servicer: HealthServicer, watch: StepWatch) -> None:
    """Runs until cancelled, setting the health of "" and slora.v1.Worker."""
    status = None
    while True:
        now = (health_pb2.HealthCheckResponse.NOT_SERVING if watch.stuck_s() > 0
               else health_pb2.HealthCheckResponse.SERVING)
        if now != status:
            status = now
            for name in ("", WORKER_SERVICE):
                await servicer.set(name, status)
        await asyncio.sleep(CHECK_INTERVAL_S)
