"""What the sync and asyncio clients share: request building, results, retry policy."""
from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from slora.client.errors import InvalidArgumentError
from slora.v1 import adapters_pb2, common_pb2, generation_pb2

FINISH_REASONS = {
    common_pb2.FINISH_REASON_UNSPECIFIED: None, common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length", common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_ERROR: "error",
}
API_KEY_ENV = "SLORA_API_KEY"
"""Where the SDK and the CLI find the API key when none is given."""
ADDRESS_ENV = "SLORA_ADDRESS"
DEFAULT_ADDRESS = "localhost:50051"
"""The frontend's host:port when neither `target` nor $SLORA_ADDRESS says otherwise."""
DATA_DIR_ENV = "SLORA_DATA_DIR"
DEFAULT_DATA_DIR = "~/.slora"
ADMIN_KEY_FILE = "admin.key"
"""In the data dir: the admin key `slora up` made at first start (mode 0600)."""
DEFAULT_MAX_NEW_TOKENS = 64
"""Output tokens of a request that names no max_new_tokens (the SDK and the CLI alike)."""
GENERATE_DEFAULTS = dict(
    adapter_id=None, chat=False, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.0,
    top_k=0, top_p=1.0, seed=None, stop=(), stop_token_ids=(), ignore_eos=False,
    return_logprobs=False, request_id=None)
"""The options of generate and stream, with their defaults (the CLI's flags use them too):
adapter_id (None: the base model; "owner/id": another tenant's), chat (apply the model's
chat template to a text prompt), max_new_tokens, temperature (0: greedy), top_k (0: off),
top_p, seed (None: random), stop (strings), stop_token_ids, ignore_eos, return_logprobs,
request_id (None: a fresh one)."""
OPERATIONS = ("generate", "stream", "register_adapter", "upload_adapter", "get_adapter",
              "list_adapters", "delete_adapter", "create_key", "list_keys", "revoke_key")
"""The public methods of Client and AsyncClient, alike (the CLI reaches each of them)."""
UPLOAD_CHUNK_BYTES = 1 << 20
RETRY_ATTEMPTS = 4
RETRY_BASE_S = 0.2


@dataclass
class TokenEvent:
    """One streamed piece of output."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None
    """Set on the last event: "stop", "length", "cancelled" or "error"."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0


@dataclass
class Generation:
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    request_id: str = ""


def generate_request(prompt: str | Sequence[int], *, adapter_id: str | None, chat: bool,
                     max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                     seed: int | None, stop: Sequence[str], stop_token_ids: Sequence[int],
                     ignore_eos: bool, return_logprobs: bool,
                     request_id: str) -> generation_pb2.GenerateRequest:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        # On the wire 0 means the server's default (16): never send it for "no tokens".
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"max_new_tokens must be an integer >= 1, got "
                                   f"{max_new_tokens!r}")
    sampling = common_pb2.SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop=list(stop), stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
    if seed is not None:
        sampling.seed = seed
    req = generation_pb2.GenerateRequest(
        request_id=request_id, adapter_id=adapter_id or "", chat=chat, sampling=sampling,
        return_logprobs=return_logprobs)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.prompt_token_ids.ids.extend(prompt)
    return req


def event_from_proto(e: generation_pb2.GenerateEvent) -> TokenEvent:
    return TokenEvent(e.text, list(e.token_ids), list(e.logprobs),
                      FINISH_REASONS.get(e.finish_reason), e.usage.prompt_tokens,
                      e.usage.completion_tokens, e.timings.time_to_first_token_s,
                      e.timings.total_s)


def generation_from_proto(r: generation_pb2.GenerateResponse) -> Generation:
    return Generation(r.text, list(r.token_ids), list(r.logprobs),
                      FINISH_REASONS.get(r.finish_reason), r.usage.prompt_tokens,
                      r.usage.completion_tokens, r.timings.time_to_first_token_s,
                      r.timings.total_s, r.request_id)


UPLOADED_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_upload_folder(folder: str) -> None:
    """Refuses, before any call, a folder that Upload cannot send: missing, without the
    two files, or holding a pickled adapter_model.bin (never unpickled: convert it)."""
    def refuse(why: str):
        raise InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"cannot upload {folder!r}: {why}")

    if not os.path.isdir(folder):
        refuse("no such folder" if not os.path.exists(folder) else "not a folder")
    missing = [n for n in UPLOADED_FILES if not os.path.isfile(os.path.join(folder, n))]
    if "adapter_model.safetensors" in missing and os.path.exists(
            os.path.join(folder, "adapter_model.bin")):
        refuse("it holds adapter_model.bin, a pickle, which slora never opens; save the "
               "adapter as safetensors (PEFT's save_pretrained does by default)")
    if missing:
        refuse(f"it lacks {' and '.join(missing)} (a PEFT folder has "
               f"{' and '.join(UPLOADED_FILES)})")
    unreadable = [n for n in UPLOADED_FILES if not os.access(os.path.join(folder, n), os.R_OK)]
    if unreadable:
        refuse(f"cannot read {', '.join(unreadable)}")


def upload_chunks(adapter_id: str, folder: str, request_id: str, public: bool = False,
                  shared_with: Sequence[str] = ()):
    """The Upload stream of a PEFT folder: the header, then each file in 1 MiB chunks."""
    yield adapters_pb2.UploadAdapterChunk(header=adapters_pb2.UploadHeader(
        adapter_id=adapter_id, request_id=request_id, public=public,
        shared_with=list(shared_with)))
    for name in UPLOADED_FILES:
        with open(os.path.join(folder, name), "rb") as f:
            while data := f.read(UPLOAD_CHUNK_BYTES):
                yield adapters_pb2.UploadAdapterChunk(
                    chunk=adapters_pb2.FileChunk(file_name=name, data=data))


def default_address() -> str:
    """$SLORA_ADDRESS, else localhost:50051."""
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def admin_key_path() -> str:
    """$SLORA_DATA_DIR/admin.key, else ~/.slora/admin.key: where `slora up` keeps its key."""
    data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return os.path.join(os.path.expanduser(data_dir), ADMIN_KEY_FILE)


def find_api_key(api_key: str | None = None) -> str | None:
    """`api_key`, else $SLORA_API_KEY, else the admin key file of the data dir
    (admin_key_path), else None (a server running with --no-auth needs none)."""
    if api_key is not None:
        return api_key
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    try:
        with open(admin_key_path()) as f:
            return f.read().strip() or None
    except OSError:
        return None


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying the key find_api_key(api_key) finds; none without one."""
    key = find_api_key(api_key)
    return (("authorization", f"Bearer {key.strip()}"),) if key else ()


def _pem(x: str | bytes | os.PathLike | None) -> bytes | None:
    """PEM bytes, given as bytes or as the path of a file."""
    if x is None or isinstance(x, bytes):
        return x
    with open(x, "rb") as f:
        return f.read()


def channel_credentials(tls: bool, tls_ca, tls_cert, tls_key) -> grpc.ChannelCredentials | None:
    """TLS credentials if any TLS option is set (None: a plaintext channel). `tls_ca`: the
    CA bundle to trust (default: the system's); `tls_cert`/`tls_key`: a client certificate
    for mTLS. Each is PEM bytes or a file path."""
    if not (tls or tls_ca or tls_cert or tls_key):
        return None
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert and tls_key go together")
    return grpc.ssl_channel_credentials(root_certificates=_pem(tls_ca),
                                        private_key=_pem(tls_key),
                                        certificate_chain=_pem(tls_cert))


def new_request_id() -> str:
    return uuid.uuid4().hex


def retryable(e: grpc.RpcError) -> bool:
    """Only UNAVAILABLE is retried: the server never started on the call."""
    return hasattr(e, "code") and e.code() == grpc.StatusCode.UNAVAILABLE


def backoff_s(attempt: int) -> float:
    return RETRY_BASE_S * (2 ** attempt) * (0.5 + random.random())
