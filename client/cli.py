"""The `slora` command line.

    slora up                          start the whole stack (SmolLM2-135M-Instruct by default)
    slora generate "Hi" --chat        stream an answer
    slora adapters add|list|get|rm    manage adapters
    slora keys create|list|revoke     manage API keys (admin); `keys generate` makes one offline
    slora demo-adapters N [--model M] write N PEFT adapters for a model and register them
    slora worker|scheduler|frontend|redis ...   run one service (compose uses these)

The client commands call the SDK's Client (client/sdk.py) with its defaults: the same
address ($SLORA_ADDRESS or localhost:50051), the same key ($SLORA_API_KEY, else
$SLORA_DATA_DIR/admin.key), the same generation defaults (messages.GENERATE_DEFAULTS).
CLI_OPERATIONS names the SDK method behind each command.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from slora.client.messages import (
    ADMIN_KEY_FILE, DATA_DIR_ENV, DEFAULT_DATA_DIR as _DEFAULT_DATA_DIR, GENERATE_DEFAULTS,
    default_address, find_api_key,
)

DEFAULT_ADDRESS = default_address()
DEFAULT_DATA_DIR = os.environ.get(DATA_DIR_ENV) or _DEFAULT_DATA_DIR
SERVICES = {
    "worker": "slora.worker.server",
    "scheduler": "slora.scheduler.server",
    "frontend": "slora.frontend.server",
    "redis": "slora.adapter_store.embedded_redis",
    "replica": "slora.client.replica_launcher",
}
CLI_OPERATIONS = {
    ("generate",): "stream", ("adapters", "add"): "register_adapter",
    ("adapters", "add", "--upload"): "upload_adapter", ("adapters", "list"): "list_adapters",
    ("adapters", "get"): "get_adapter", ("adapters", "rm"): "delete_adapter",
    ("keys", "create"): "create_key", ("keys", "list"): "list_keys",
    ("keys", "revoke"): "revoke_key", ("demo-adapters",): "register_adapter",
}
"""The SDK method each command calls (`generate` streams; Client.generate is the same call
gathered)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none to show (None, off)."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or (
                isinstance(default, (list, tuple)) and not default):
            return action.help
        return super()._get_help_string(action)


def _parser(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def _up_parser(sub) -> None:
    p = _parser(sub, "up", help="start redis, worker, scheduler and frontend",
                description="Starts redis, worker, scheduler and frontend; Ctrl-C drains "
                            "and stops them (a second Ctrl-C stops them at once).")
    p.add_argument("--model", default=None,
                   help="HF-format folder (Llama, Mistral, Qwen2, Qwen3) or a dummy name "
                        "such as dummy-llama-7b, dummy-qwen2.5-7b, dummy-mistral-7b "
                        "(default: SmolLM2-135M-Instruct, converted once into --data-dir)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="models, adapters, redis data and the admin key ($SLORA_DATA_DIR)")
    p.add_argument("--host", default="127.0.0.1", help="public address of the frontend")
    p.add_argument("--port", type=int, default=int(os.environ.get("SLORA_PORT", "50051")),
                   help="public port (0: any free port; $SLORA_PORT)")
    p.add_argument("--http-port", type=int,
                   default=int(os.environ.get("SLORA_HTTP_PORT", "8000")),
                   help="port of the OpenAI-compatible HTTP API (0: any free port; -1: off; "
                        "$SLORA_HTTP_PORT)")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of the embedded one")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    p.add_argument("--num-pages", type=int, default=None,
                   help="pages of the unified pool (default: sized by the worker from the "
                        "model, the device and the limits below; its log says how)")
    p.add_argument("--pool-gib", type=float, default=None,
                   help="the unified pool's size in GiB instead (GPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="share of the GPU's memory the worker may use (default 0.9)")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="highest adapter rank the pool accepts (worker default 64)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests running at once (default: on a GPU, what the pool keeps, "
                        "at most 512; on the CPU, 4)")
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="longest context of one request, prompt + output tokens")
    p.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="worker processes, one per GPU (cuda:0..N-1), each holding 1/N of "
                        "the model, adapters and pool; on the CPU, N processes over gloo")
    p.add_argument("--collective-timeout-s", type=float, default=None,
                   help="with --tensor-parallel-size: a rank that keeps a collective waiting "
                        "this long takes the worker group down, to be restarted (default 20)")
    p.add_argument("--replicas", type=int, default=1,
                   help="model replicas (a worker and a scheduler each; the visible GPUs "
                        "are split between them; the frontend routes by adapter)")
    p.add_argument("--hung-step-floor-s", type=float, default=None,
                   help="seconds a step may always take before the worker counts as hung "
                        "(scheduler default 20; a step past 10x its expected time and "
                        "this ends its requests UNAVAILABLE and the worker is restarted)")
    p.add_argument("--start-timeout", type=float, default=600.0,
                   help="seconds each service may take to start")
    p.add_argument("--no-auth", action="store_true",
                   help="serve without API keys (local play only)")
    p.add_argument("--adapter-roots", action="append", default=None,
                   help="folder that registration by path may read from (repeatable; "
                        "default: your home folder)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate of the public port")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None,
                   help="PEM CA that client certificates must be signed by (mTLS)")
    p.add_argument("--strict-base-model", action="store_true",
                   help="refuse adapters whose base_model_name_or_path is not the served "
                        "model's name (default: accept them with a warning when the shapes fit)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus metrics of the frontend on this port, the scheduler's on "
                        "the next, the worker's on the one after (default: free ports, "
                        "printed at start)")
    p.add_argument("--log-format", choices=["auto", "text", "json"], default="auto",
                   help="the services' log lines: text, or one JSON object a line; auto: "
                        "text when stdout is a terminal, else JSON")


def _client_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--address", default=DEFAULT_ADDRESS,
                   help="frontend host:port ($SLORA_ADDRESS)")
    p.add_argument("--api-key", default=None,
                   help="API key (default: $SLORA_API_KEY, else the admin key `slora up` "
                        f"wrote to $SLORA_DATA_DIR/{ADMIN_KEY_FILE} or ~/.slora/{ADMIN_KEY_FILE})")
    p.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs")
    p.add_argument("--tls-ca", default=None, help="PEM CA bundle to trust (implies --tls)")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate (mTLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    return p


def default_api_key() -> str | None:
    """What the SDK finds without api_key= (messages.find_api_key)."""
    return find_api_key()


def _generate_parser(sub, parent) -> None:
    d = GENERATE_DEFAULTS
    p = _parser(sub, "generate", parents=[parent], help="stream a completion")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--adapter", default=d["adapter_id"],
                   help="adapter id to generate with: your own, or another tenant's as "
                        "OWNER/ID (default: the base model alone)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=d["max_new_tokens"],
                   help="most output tokens (at most the model's context, which also ends "
                        "the output)")
    p.add_argument("--temperature", type=float, default=d["temperature"],
                   help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=d["top_k"],
                   help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=d["seed"],
                   help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=list(d["stop"]),
                   help="stop string (repeatable)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _adapters_parser(sub, parent) -> None:
    p = _parser(sub, "adapters", help="register, list, inspect and delete adapters")
    asub = p.add_subparsers(dest="adapters_command", required=True)
    add = _parser(asub, "add", parents=[parent], help="register a PEFT folder (the same "
                  "folder under the same id again is no error)")
    add.add_argument("adapter_id", help="the id requests will name it by")
    add.add_argument("path", help="PEFT folder (adapter_config.json + "
                                  "adapter_model.safetensors)")
    add.add_argument("--upload", action="store_true",
                     help="upload the folder's files instead of passing its path")
    add.add_argument("--public", action="store_true", help="every tenant may use it")
    add.add_argument("--share-with", action="append", default=[], metavar="TENANT",
                     help="a tenant that may use it (repeatable)")
    _parser(asub, "list", parents=[parent], help="list adapters")
    get = _parser(asub, "get", parents=[parent], help="show one adapter")
    get.add_argument("adapter_id", help="your adapter's id, or OWNER/ID")
    rm = _parser(asub, "rm", parents=[parent], help="delete an adapter")
    rm.add_argument("adapter_id", help="your adapter's id")


def _keys_parser(sub, parent) -> None:
    p = _parser(sub, "keys", help="create, list and revoke API keys (needs the admin key)")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    create = _parser(ksub, "create", parents=[parent], help="make a key for a tenant")
    create.add_argument("tenant", help="the tenant the key acts for")
    create.add_argument("--admin", action="store_true", help="may manage keys")
    create.add_argument("--description", default="", help="a note kept with the key")
    lst = _parser(ksub, "list", parents=[parent], help="list keys (never their secrets)")
    lst.add_argument("--tenant", default="", help="only this tenant's keys (default: all)")
    lst.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = _parser(ksub, "revoke", parents=[parent], help="revoke a key by its id")
    revoke.add_argument("key_id", help="the key's id (`slora keys list`)")
    _parser(ksub, "generate", help="print a new well-formed key, offline (e.g. for "
                                     "SLORA_ADMIN_KEY); the server stores it when first used")


def _demo_parser(sub, parent) -> None:
    p = _parser(sub, "demo-adapters", parents=[parent],
                help="write N random PEFT adapters for a model and register them (again: "
                     "tops up to N)")
    p.add_argument("count", type=int, help="adapters demo-0 .. demo-<N-1>")
    p.add_argument("--model", default=None,
                   help="HF-format folder or dummy name (default: the model `slora up` serves "
                        "by default, converted once into $SLORA_DATA_DIR or ~/.slora)")
    p.add_argument("--out", default=os.path.join(DEFAULT_DATA_DIR, "demo-adapters"),
                   help="folder to write them in")
    p.add_argument("--ranks", default="8,16,32,64", help="ranks, assigned round-robin")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of adapter 0's weights (adapter i: seed + i)")
    p.add_argument("--no-register", action="store_true", help="only write the folders")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slora", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    parent = _client_parent()
    _up_parser(sub)
    _generate_parser(sub, parent)
    _adapters_parser(sub, parent)
    _keys_parser(sub, parent)
    _demo_parser(sub, parent)
    for name, module in SERVICES.items():
        sub.add_parser(name, add_help=False, help=f"run the {name} service ({module})")
    return parser


def _print_adapter(a) -> None:
    print(f"{a.ref or a.adapter_id}\trank={a.rank}\talpha={a.lora_alpha:g}\t"
          f"targets={','.join(a.target_modules)}\tpages={a.num_pages}\t"
          f"sha256={a.sha256[:12]}\tbytes={a.size_bytes}")
    for warning in a.warnings:
        print(f"slora: warning: {warning}", file=sys.stderr)


def _run_client(args) -> int:
    from slora.client import Client, SloraClientError

    api_key = find_api_key(args.api_key)
    try:
        with Client(args.address, api_key=api_key, tls=args.tls, tls_ca=args.tls_ca,
                    tls_cert=args.tls_cert, tls_key=args.tls_key) as client:
            if args.command == "generate":
                for event in client.stream(
                        args.prompt, adapter_id=args.adapter, chat=args.chat,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop):
                    print(event.text, end="", flush=True)
                print()
            elif args.command == "adapters":
                cmd = args.adapters_command
                if cmd == "add":
                    path = os.path.abspath(os.path.expanduser(args.path))
                    sharing = dict(public=args.public, shared_with=args.share_with)
                    a = (client.upload_adapter(args.adapter_id, path, **sharing) if args.upload
                         else client.register_adapter(args.adapter_id, path, **sharing))
                    _print_adapter(a)
                elif cmd == "list":
                    for a in client.list_adapters():
                        _print_adapter(a)
                elif cmd == "get":
                    _print_adapter(client.get_adapter(args.adapter_id))
                elif cmd == "rm":
                    client.delete_adapter(args.adapter_id)
                    print(f"deleted {args.adapter_id}")
            elif args.command == "keys":
                _keys(args, client)
            elif args.command == "demo-adapters":
                return _demo(args, client)
    except SloraClientError as e:
        print(f"slora: {e}", file=sys.stderr)
        if getattr(e, "shutting_down", False):
            print("slora: the server is shutting down; run the command again once it is back "
                  "(`slora up` starts it)", file=sys.stderr)
        elif e.code.name == "UNAVAILABLE":
            print(f"slora: is the server up at {args.address}? `slora up` starts one; "
                  "--address or $SLORA_ADDRESS picks another", file=sys.stderr)
        return 1
    return 0


def _print_key(k) -> None:
    state = "active" if not k.revoked_unix else "revoked"
    print(f"{k.key_id}\ttenant={k.tenant}\t{'admin' if k.admin else 'user'}\t{state}\t"
          f"{k.description}")


def _keys(args, client) -> None:
    cmd = args.keys_command
    if cmd == "create":
        made = client.create_key(args.tenant, admin=args.admin, description=args.description)
        _print_key(made.key)
        print(f"key (shown once, keep it secret): {made.secret}")
    elif cmd == "list":
        for k in client.list_keys(args.tenant, include_revoked=args.all):
            _print_key(k)
    elif cmd == "revoke":
        _print_key(client.revoke_key(args.key_id))


def _demo(args, client) -> int:
    from slora.adapter_store.demo import write_demo_adapters
    from slora.models.registry import DUMMY_MODELS, dummy_model_config, model_config_from_folder

    ranks = [int(r) for r in args.ranks.split(",")]
    out = os.path.abspath(os.path.expanduser(args.out))
    model = args.model
    if model is None:
        from slora.models.gguf_convert import ensure_default_model

        model = ensure_default_model(os.path.expanduser(DEFAULT_DATA_DIR))
    cfg = dummy_model_config(model) if model in DUMMY_MODELS else model_config_from_folder(model)
    started = time.time()
    paths = write_demo_adapters(cfg, out, args.count, ranks, args.seed)
    num_new = 0
    for i, path in enumerate(paths):
        if not args.no_register:
            record = client.register_adapter(os.path.basename(path), path)
            num_new += record.created_unix >= started
        print(f"\r{i + 1}/{len(paths)} {path}", end="", flush=True)
    print()
    if not args.no_register:
        print(f"{num_new} adapters registered, {len(paths) - num_new} already were: "
              f"demo-0 .. demo-{len(paths) - 1}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SERVICES:
        import importlib

        return importlib.import_module(SERVICES[argv[0]]).main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    if args.command == "up":
        from slora.client.launcher import up

        return up(args)
    if args.command == "keys" and args.keys_command == "generate":
        from slora.adapter_store.keys import new_key

        print(new_key()[1])
        return 0
    try:
        return _run_client(args)
    except BrokenPipeError:
        # The reader went away (`slora adapters list | head`). Exit 1 as Python does, and point
        # stdout at /dev/null so that the interpreter's final flush does not print a trace.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
