from slora.v1 import common_pb2 as _common_pb2
from slora.v1 import scheduler_pb2 as _scheduler_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterLoad(_message.Message):
    __slots__ = ("adapter_id", "path", "slot", "page_ids")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    path: str
    slot: int
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, adapter_id: _Optional[str] = ..., path: _Optional[str] = ..., slot: _Optional[int] = ..., page_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class NewRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "num_prompt_tokens", "page_ids", "num_scheduled_tokens", "adapter_slot", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_SCHEDULED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_prompt_tokens: int
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    num_scheduled_tokens: int
    adapter_slot: int
    sampling: _common_pb2.SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_prompt_tokens: _Optional[int] = ..., page_ids: _Optional[_Iterable[int]] = ..., num_scheduled_tokens: _Optional[int] = ..., adapter_slot: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class RunningRequest(_message.Message):
    __slots__ = ("request_id", "new_page_ids", "num_computed_tokens", "num_scheduled_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SCHEDULED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    new_page_ids: _containers.RepeatedScalarFieldContainer[int]
    num_computed_tokens: int
    num_scheduled_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., new_page_ids: _Optional[_Iterable[int]] = ..., num_computed_tokens: _Optional[int] = ..., num_scheduled_tokens: _Optional[int] = ...) -> None: ...

class StepCommand(_message.Message):
    __slots__ = ("step_id", "new_requests", "running_requests", "finished_request_ids", "adapter_evictions", "adapter_loads")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_LOADS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    new_requests: _containers.RepeatedCompositeFieldContainer[NewRequest]
    running_requests: _containers.RepeatedCompositeFieldContainer[RunningRequest]
    finished_request_ids: _containers.RepeatedScalarFieldContainer[str]
    adapter_evictions: _containers.RepeatedScalarFieldContainer[int]
    adapter_loads: _containers.RepeatedCompositeFieldContainer[AdapterLoad]
    def __init__(self, step_id: _Optional[int] = ..., new_requests: _Optional[_Iterable[_Union[NewRequest, _Mapping]]] = ..., running_requests: _Optional[_Iterable[_Union[RunningRequest, _Mapping]]] = ..., finished_request_ids: _Optional[_Iterable[str]] = ..., adapter_evictions: _Optional[_Iterable[int]] = ..., adapter_loads: _Optional[_Iterable[_Union[AdapterLoad, _Mapping]]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "request_ids", "token_ids", "logprobs", "step_time_s", "error", "request_errors", "adapter_errors")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ERRORS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ERRORS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    step_time_s: float
    error: str
    request_errors: _containers.RepeatedCompositeFieldContainer[RequestError]
    adapter_errors: _containers.RepeatedCompositeFieldContainer[AdapterLoadError]
    def __init__(self, step_id: _Optional[int] = ..., request_ids: _Optional[_Iterable[str]] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., step_time_s: _Optional[float] = ..., error: _Optional[str] = ..., request_errors: _Optional[_Iterable[_Union[RequestError, _Mapping]]] = ..., adapter_errors: _Optional[_Iterable[_Union[AdapterLoadError, _Mapping]]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("request_id", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    error: str
    def __init__(self, request_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class AdapterLoadError(_message.Message):
    __slots__ = ("adapter_id", "error")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    error: str
    def __init__(self, adapter_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
