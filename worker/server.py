"""The worker process: slora.v1.Worker over grpc.aio around one `Worker` (executor.py).

Owner: worker/. The scheduler drives it over one `Steps` stream. Commands run strictly in
order on one executor thread, which owns the device (the Worker is built on it too), so the
event loop keeps reading the next command, and sending the last result, while a step runs.
One StepResult per command, in order.

A Steps stream is a session. It starts from an empty worker: no request state and no
adapter in any slot. A newer stream supersedes an older one, whose later commands are
answered with an error and not run (a scheduler that restarted, or one that reset). Only a
caller with the deployment's internal secret gets that far (common/internal_auth.py): a
stranger's Steps, or Info, is refused before the session starts, so it can neither replace
the scheduler's stream nor reset the worker.

A request can fail alone (its sampling raised, or its adapter's files changed since
registration and its load failed): the step result lists it in `request_errors` (and the
adapter in `adapter_errors`), the worker drops that request's state (and empties that
adapter's slot, touching no other) and the step's other requests run as planned. Commands
already planned may still name the failed request; the worker skips it until the scheduler
lists it as finished.

When a whole step fails (an exception outside one request: a bug, a kernel error), the
executor stops part-way through it, drops all per-request state and empties every adapter
slot, and returns a result with `error`: executor.py. The scheduler has already sent the
next command, planned as if this one had succeeded. So the server
* answers the failed step with that result;
* answers every later command of that stream with an error, running none of them.
The scheduler, on the failed result, sends its running requests back to the queue (they are
recomputed from their tokens; a request in a second failed step ends UNAVAILABLE), forgets
which adapters are resident and opens a new stream, which finds the worker empty: both
sides agree again without any extra message.

With --tensor-parallel-size N this process is rank 0 of the group (tp_group.py): it starts
the other ranks, and pings them from the executor thread whenever no message has gone to them
for PING_INTERVAL_S. When the group fails (a rank exits, or a collective fails or times
out), there is no worker left to serve: this process kills the other ranks and exits with
EXIT_GROUP_DOWN, which ends the Steps stream, so the scheduler ends the requests in flight
with UNAVAILABLE, and the launcher (`slora up`, compose's restart policy) starts the whole
group again.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import logging
import os
import signal
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from slora.common.aio import run_async
from slora.common.config import EngineConfig
from slora.common.errors import SloraError, TensorParallelGroupError
from slora.common.grpc_options import listen, server_options
from slora.common.internal_auth import InternalAuth, add_internal_secret_args, internal_secret
from slora.common.lifecycle import HealthServicer, ready_line
from slora.common.logs import add_log_args, setup_logging
from slora.common.metrics import add_metrics_args, start_metrics_server
from slora.protos.model_info import model_info_from_config
from slora.protos.convert import step_command_from_proto, step_result_to_proto
from slora.protos.step import StepCommand, StepResult
from slora.v1 import worker_pb2, worker_pb2_grpc
from slora.worker import metrics
from slora.worker.args import add_engine_args, engine_config_from_args
from slora.worker.memory_plan import prefer_expandable_segments
from slora.worker.executor import Worker
from slora.worker.tp_group import PING_INTERVAL_S
from slora.worker.liveness import (DEFAULT_HUNG_STEP_EXIT_S, DEFAULT_HUNG_STEP_S, StepWatch,
                                   keep_health)

log = logging.getLogger("slora.worker")

NO_FAILED_STEP = -1
EXIT_GROUP_DOWN = 75
"""Exit status of rank 0 when its tensor-parallel group has failed."""
END_OF_STREAM = None
"""Put on a stream's result queue after its last command."""


class _Session:
    """One Steps stream as the executor thread sees it."""

    def __init__(self, session_id: int):
        self.session_id = session_id
        self.failed_step_id = NO_FAILED_STEP


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker: Worker, model_path: str | None,
                 executor: concurrent.futures.ThreadPoolExecutor, watch: StepWatch):
        self.worker = worker
        self.watch = watch
        self._executor = executor
        """One thread: runs every step, in order, and owns the device."""
        self._session_ids = itertools.count(1)
        self._active_session_id = 0
        """Read and written on the executor thread only."""
        self._info = model_info_from_config(worker.config, model_path)
        self.last_message_s = time.monotonic()
        """When the executor last gave the other ranks a message (tensor parallelism)."""
        if worker.group is not None:
            worker.group.on_rank_exit = lambda rank, code: self.group_down(
                f"tensor-parallel rank {rank} exited with code {code}")

    def group_down(self, reason: str) -> None:
        """The tensor-parallel group has failed: kill its other ranks, exit (module doc)."""
        log.error("%s: the worker group is down; exiting so that it is restarted", reason)
        self.worker.group.kill_children()
        logging.shutdown()
        os._exit(EXIT_GROUP_DOWN)

    def ping(self) -> None:
        """On the executor thread: pings the other ranks if nothing has reached them for
        PING_INTERVAL_S."""
        if time.monotonic() - self.last_message_s < PING_INTERVAL_S:
            return
        try:
            self.worker.ping()
        except TensorParallelGroupError as e:
            self.group_down(str(e))
        self.last_message_s = time.monotonic()

    async def Info(self, request, context):
        return self._info

    async def Steps(self, request_iterator, context):
        session = _Session(next(self._session_ids))
        loop = asyncio.get_running_loop()
        self._executor.submit(self._start_session, session)  # runs before its commands
        results: asyncio.Queue = asyncio.Queue()

        async def read_commands():
            try:
                async for msg in request_iterator:
                    # Converted here, while the executor runs the step before it.
                    try:
                        cmd = step_command_from_proto(msg)
                    except Exception as e:  # fails in its turn, like a failed step
                        cmd = e
                    results.put_nowait(loop.run_in_executor(
                        self._executor, self._run_step, session, msg.step_id, cmd))
            except grpc.aio.AioRpcError as e:
                log.info("Steps stream %d: reading ended: %s", session.session_id, e.code())
            finally:
                results.put_nowait(END_OF_STREAM)

        log.info("Steps stream %d opened by %s", session.session_id, context.peer())
        reader = asyncio.create_task(read_commands())
        try:
            while (future := await results.get()) is not END_OF_STREAM:
                result = await future
                yield result if isinstance(result, worker_pb2.StepResult) \
                    else step_result_to_proto(result)
        finally:
            reader.cancel()
            log.info("Steps stream %d closed", session.session_id)

    # -- on the executor thread -----------------------------------------------------------

    def _start_session(self, session: _Session) -> None:
        self._active_session_id = session.session_id
        self._drop_state()

    def _drop_state(self) -> None:
        try:
            self.worker.reset()
        except TensorParallelGroupError as e:
            self.group_down(str(e))
        self.last_message_s = time.monotonic()

    def _run_step(self, session: _Session, step_id: int, cmd: StepCommand | Exception
                  ) -> StepResult | worker_pb2.StepResult:
        """The step's result, or a StepResult message with `error` when it was not run or
        failed."""
        if session.session_id != self._active_session_id:
            return worker_pb2.StepResult(
                step_id=step_id,
                error=f"step {step_id} not run: a newer Steps stream replaced this one")
        if session.failed_step_id != NO_FAILED_STEP:
            return worker_pb2.StepResult(
                step_id=step_id,
                error=f"step {step_id} not run: step {session.failed_step_id} of this "
                      "stream failed; open a new Steps stream")
        if isinstance(cmd, Exception):  # the command did not convert: not run
            log.error("step %d: %s", step_id, cmd)
            session.failed_step_id = step_id
            self._drop_state()
            return worker_pb2.StepResult(
                step_id=step_id,
                error=f"step {step_id} failed on the worker: {type(cmd).__name__}: {cmd}")
        self._log_command(cmd)
        self.watch.begin()
        try:
            result = self.worker.execute(cmd)  # a failed step comes back in the result
        except TensorParallelGroupError as e:
            self.group_down(f"step {step_id}: {e}")
        finally:
            self.watch.end()
        self.last_message_s = time.monotonic()
        if result.error:
            session.failed_step_id = step_id
        else:
            metrics.STEP_TIME.observe(result.step_time_s)
        return result

    @staticmethod
    def _log_command(cmd: StepCommand) -> None:
        for new in cmd.new_requests:
            log.info("request started", extra={
                "request_id": new.req_id, "num_tokens": len(new.token_ids),
                "num_prompt_tokens": new.num_prompt_tokens, "adapter_slot": new.adapter_slot,
                "step_id": cmd.step_id})
        for load in cmd.adapter_loads:
            log.info("adapter loaded", extra={"adapter_id": load.adapter_id, "slot": load.slot,
                                              "num_pages": len(load.page_ids)})
        if log.isEnabledFor(logging.DEBUG):
            for req_id in cmd.finished_req_ids:
                log.debug("request state dropped", extra={"request_id": req_id})


# -- the process ---------------------------------------------------------------------------

async def serve_until_signal(server: grpc.aio.Server, name: str, port: int,
                             metrics_port: int) -> None:
    """Prints the ready line, then serves until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A launcher waits for this line; keep its form.
    print(ready_line(name, port, metrics_port), flush=True)
    await stop.wait()
    log.info("stopping")
    await server.stop(grace=1.0)


async def _ping_while_idle(service: WorkerService,
                           executor: concurrent.futures.ThreadPoolExecutor) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(PING_INTERVAL_S / 2)
        await loop.run_in_executor(executor, service.ping)


async def serve(config: EngineConfig, model_path: str | None, host: str, port: int,
                backend: str, secret: str, metrics_host: str = "127.0.0.1",
                metrics_port: int = -1, cuda_graphs: bool = True,
                collective_timeout_s: float = 20.0,
                hung_step_s: float = DEFAULT_HUNG_STEP_S,
                hung_step_exit_s: float = DEFAULT_HUNG_STEP_EXIT_S) -> None:
    # The ports first: one in use fails at once, not after the model has loaded.
    server = grpc.aio.server(interceptors=[InternalAuth(secret, "worker")],
                             options=server_options())
    bound_port = listen(server, "worker", host, port)
    metrics_port = start_metrics_server(metrics_host, metrics_port)
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="slora-step")
    loop = asyncio.get_running_loop()
    # Built on the executor thread, which then lives as long as the server: the other
    # ranks of a tensor-parallel group die with the thread that started them.
    worker = await loop.run_in_executor(
        executor, lambda: Worker(config, model_path, backend, cuda_graphs,
                                 collective_timeout_s=collective_timeout_s))
    watch = StepWatch(hung_step_s, hung_step_exit_s)
    service = WorkerService(worker, model_path, executor, watch)
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    pinger = asyncio.create_task(_ping_while_idle(service, executor)) \
        if worker.group is not None else None
    # Health for probes (compose, Kubernetes, slora up): SERVING once the weights are
    # loaded, which is before the server starts listening; NOT_SERVING while a step is stuck
    # (worker/liveness.py).
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_task = asyncio.create_task(keep_health(health_servicer, watch))
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s (%d pages, %s on %s) on %s:%d", config.model.name,
             config.pool.num_pages, config.dtype, config.device, host, bound_port)
    metrics.register_worker_stats(worker)
    try:
        await serve_until_signal(server, "worker", bound_port, metrics_port)
    finally:
        if pinger is not None:
            pinger.cancel()
        await loop.run_in_executor(executor, worker.close)
        health_task.cancel()
        executor.shutdown(wait=True)


def _seconds_or_off(text: str) -> float:
    """A non-negative number of seconds (0: off), for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0 (0: never)")
    return value


def main(argv: list[str] | None = None) -> None:
    prefer_expandable_segments()  # before CUDA starts (memory_plan.py says why)
    parser = argparse.ArgumentParser(
        prog="slora-worker",
        description="Serve slora.v1.Worker: run the scheduler's step commands on one device, "
                    "or on N with --tensor-parallel-size N.")
    add_engine_args(parser)
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "cuda"],
                        help="LoRA and attention kernels: CuPy on CUDA (auto when available) "
                             "or the torch reference")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0,
                        help="port to listen on; 0 picks a free one (printed on the "
                             "SLORA_READY line)")
    add_internal_secret_args(parser)
    parser.add_argument("--hung-step-s", type=float, default=DEFAULT_HUNG_STEP_S,
                        help="health (grpc.health.v1) says NOT_SERVING while one step has "
                             "run longer than this (a supervisor then restarts the worker)")
    parser.add_argument("--hung-step-exit-s", type=_seconds_or_off,
                        default=DEFAULT_HUNG_STEP_EXIT_S,
                        help="exit (status 3, every thread's stack on stderr) once one step "
                             "has run this long, or the process has not run Python this long, "
                             "so that a supervisor restarting only exited processes (compose, "
                             "systemd) restarts a hung worker; 0: never")
    add_metrics_args(parser)
    add_log_args(parser)
    args = parser.parse_args(argv)
    setup_logging("worker", args.log_level, args.log_format)
    try:
        config, model_path = engine_config_from_args(args)
        secret = internal_secret(args)
        run_async(serve(config, model_path, args.host, args.port, args.backend, secret,
                        args.metrics_host, args.metrics_port, args.cuda_graphs,
                        args.collective_timeout_s, args.hung_step_s,
                        args.hung_step_exit_s))
    except SloraError as e:  # a bad flag, model folder or config: say which and stop
        parser.exit(1, f"slora-worker: error: {e}\n")


if __name__ == "__main__":
    main()
