"""The in-process engine: one scheduler and one worker in the same process, the step
command handed over as the dataclass itself. Tests use it directly; the scheduler and
worker processes of the services wrap the same two halves around gRPC."""
from __future__ import annotations

import itertools

from slora.adapter_store import read_adapter_config
from slora.common.config import EngineConfig
from slora.common.errors import AdapterNotFoundError, InvalidRequestError
from slora.common.sampling_params import SamplingParams
from slora.protos.step import StepCommand, StepResult
from slora.scheduler.adapter_residency import AdapterRef
from slora.scheduler.planner import Scheduler
from slora.scheduler.request import RequestOutput
from slora.worker.executor import Worker


class Engine:
    def __init__(self, config: EngineConfig, model_path: str | None = None,
                 backend: str = "auto"):
        self.config = config
        # The worker first: sized from memory, it writes its pool and batch into the config.
        self.worker = Worker(config, model_path, backend)
        self.scheduler = Scheduler(config)
        self.adapters: dict[str, AdapterRef] = {}
        self._req_ids = itertools.count()

    def close(self) -> None:
        """Stops the other ranks of a tensor-parallel worker group (nothing without one)."""
        self.worker.close()

    def add_adapter(self, adapter_id: str, path: str) -> AdapterRef:
        """Validates a PEFT folder (config and every tensor) and makes it servable."""
        cfg = self.config
        spec = read_adapter_config(adapter_id, path, cfg.model, cfg.pool.max_lora_rank)
        self.worker.host_cache.invalidate(adapter_id)
        self.worker.host_cache.get(adapter_id, path)  # full check of the weights, now
        ref = AdapterRef(adapter_id, path, cfg.model.adapter_num_pages(spec.module_ranks))
        self.adapters[adapter_id] = ref
        return ref

    def submit(self, prompt_token_ids: list[int], sampling: SamplingParams | None = None,
               adapter_id: str | None = None, req_id: str | None = None) -> str:
        if adapter_id is not None and adapter_id not in self.adapters:
            raise AdapterNotFoundError(adapter_id)
        if req_id is None:
            req_id = f"req-{next(self._req_ids)}"
        if not isinstance(prompt_token_ids, (list, tuple)):
            raise InvalidRequestError("prompt_token_ids must be a list of integers")
        self.scheduler.submit(req_id, list(prompt_token_ids), sampling or SamplingParams(),
                              None if adapter_id is None else self.adapters[adapter_id])
        return req_id

    def cancel(self, req_id: str) -> RequestOutput | None:
        return self.scheduler.cancel(req_id)

    def step(self) -> list[RequestOutput]:
        cmd = self.scheduler.schedule()
        if not (cmd.new_requests or cmd.running_requests or cmd.finished_req_ids
                or cmd.adapter_loads or cmd.adapter_evictions):
            return []
        result = self.worker.execute(cmd)
        if result.error:
            return self._recover_from_failed_step(cmd, result)
        # An adapter whose files changed under us since registration fails its own requests
        # (in the result); the rest of the step ran.
        for adapter_id in result.adapter_errors:
            self.adapters.pop(adapter_id, None)
        return self.scheduler.update(result)

    def _recover_from_failed_step(self, cmd: StepCommand, result: StepResult
                                  ) -> list[RequestOutput]:
        """A whole step failed (a bug: one request's or one adapter's failure comes back in
        a successful result): this step's requests fail (in-process there is one caller to
        tell). The worker stopped part-way through the step and emptied itself; the
        scheduler forgets its side too, and running requests are recomputed from their
        tokens, which is always correct."""
        if result.adapter_errors:  # found before any rank ran the step: only its requests
            outputs = []
            for adapter_id, error in result.adapter_errors.items():
                self.adapters.pop(adapter_id, None)
                outputs += self.scheduler.abort_adapter(adapter_id, error)
        else:
            outputs = self.scheduler.abort_requests(
                [r.req_id for r in cmd.new_requests] + [r.req_id for r in cmd.running_requests],
                result.error)
        self.scheduler.forget_worker_state()
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | None = None,
                 adapter_ids: list[str | None] | None = None) -> list[list[int]]:
        """Runs prompts to completion together; returns each one's output token ids."""
        adapter_ids = adapter_ids or [None] * len(prompts)
        req_ids = [self.submit(p, sampling, a) for p, a in zip(prompts, adapter_ids)]
        outputs: dict[str, list[int]] = {r: [] for r in req_ids}
        while self.has_unfinished():
            for out in self.step():
                if out.req_id in outputs:
                    outputs[out.req_id] += out.new_token_ids
        return [outputs[r] for r in req_ids]
