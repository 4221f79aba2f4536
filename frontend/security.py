"""The frontend's security settings: flags, the admin key at first start, TLS on the public
port. (The checks themselves: auth.py for keys and limits, adapter_store/intake.py for paths.)

Admin key. A frontend with auth on makes sure an admin key exists before it serves:
- given by the operator (env SLORA_ADMIN_KEY, or the file of --admin-key-file if it exists):
  stored (hashed) if Redis does not have it yet;
- otherwise, if Redis has no active admin key, one is made, printed once on stdout and, with
  --admin-key-file, written to that file with mode 0600 (what `slora up` does, so that the CLI
  on the same machine finds it); Redis keeps only its hash. Frontends starting together make
  one between them (keys.py).

TLS. --tls-cert/--tls-key serve the public port over TLS; --tls-client-ca also requires a
client certificate signed by that CA (mTLS). Without them the port is plaintext, fine on
loopback; the API keys then cross the network in clear, hence a warning on other addresses.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

import grpc

from slora.adapter_store.intake import AdapterRoots
from slora.adapter_store.keys import KeyStore, parse_key
from slora.common.errors import AuthenticationError, ConfigError
from slora.common.grpc_options import listen
from slora.frontend.auth import AuthInterceptor, TenantLimiter

log = logging.getLogger("slora.frontend")

ADMIN_KEY_ENV = "SLORA_ADMIN_KEY"
DEFAULT_MAX_REQUESTS_PER_TENANT = 1024
DEFAULT_MAX_ADAPTERS_PER_TENANT = 10_000
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
NO_AUTH_WARNING = """\
******************************************************************************
*  slora: AUTH IS OFF (--no-auth). Anyone who reaches this port can generate,  *
*  register and delete adapters. For local play only.                        *
******************************************************************************"""


def add_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-auth", action="store_true",
                   help="serve without API keys (local play only: everyone is one anonymous "
                        "tenant)")
    p.add_argument("--admin-key-file", default=None,
                   help="file with the admin key: read if it exists, else written (mode 0600) "
                        f"with the key made at first start (env {ADMIN_KEY_ENV} wins)")
    p.add_argument("--adapter-roots", action="append", default=[],
                   help="folder that registration by path may read from (repeatable, or "
                        f"'{os.pathsep}'-separated); none: registration by path is refused")
    p.add_argument("--max-requests-per-tenant", type=int,
                   default=DEFAULT_MAX_REQUESTS_PER_TENANT,
                   help="concurrent generation calls per tenant on this frontend (0: no limit)")
    p.add_argument("--max-adapters-per-tenant", type=int,
                   default=DEFAULT_MAX_ADAPTERS_PER_TENANT,
                   help="registered adapters per tenant (0: no limit)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain of the public port")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None,
                   help="PEM CA bundle: clients must present a certificate it signed (mTLS)")


@dataclass
class Security:
    interceptor: AuthInterceptor
    keys: KeyStore | None
    """None when auth is off."""
    roots: AdapterRoots


def adapter_roots(args, store_dir: str) -> AdapterRoots:
    folders = [f for arg in args.adapter_roots for f in arg.split(os.pathsep) if f]
    for folder in folders:
        if not os.path.isdir(os.path.expanduser(folder)):
            log.warning("adapter root %r is not a folder (yet): nothing can be registered "
                        "from it until it is", folder)
    return AdapterRoots(folders, store_dir)


async def setup_security(args, redis_client, store_dir: str) -> Security:
    """Keys (and the admin key), limits and roots, from the flags; call before serving."""
    roots = adapter_roots(args, store_dir)
    limiter = TenantLimiter(args.max_requests_per_tenant)
    if args.no_auth:
        print(NO_AUTH_WARNING, file=sys.stderr, flush=True)
        log.warning("auth is off (--no-auth): every caller is one anonymous admin tenant")
        return Security(AuthInterceptor(None, limiter), None, roots)
    keys = KeyStore(redis_client)
    await bootstrap_admin_key(keys, args.admin_key_file)
    if not args.tls_cert and args.host not in LOOPBACK_HOSTS:
        log.warning("the public port %s is plaintext: API keys cross the network in clear; "
                    "serve it with --tls-cert/--tls-key", args.host)
    return Security(AuthInterceptor(keys, limiter), keys, roots)


async def bootstrap_admin_key(keys: KeyStore, key_file: str | None) -> None:
    given = os.environ.get(ADMIN_KEY_ENV)
    source = ADMIN_KEY_ENV
    if not given and key_file and os.path.exists(key_file):
        with open(key_file) as f:
            given, source = f.read().strip(), key_file
    if given:
        try:
            parse_key(given)
            record, _ = await keys.bootstrap_admin(given)
        except AuthenticationError as e:
            raise ConfigError(f"the admin key from {source} cannot be used: {e} (a key reads "
                              "slora_<16 hex digits>_<43 characters>; `slora keys generate` "
                              "makes one)") from None
        if not record.active:
            log.warning("the admin key from %s (%s) was revoked", source, record.key_id)
        return
    record, key = await keys.bootstrap_admin()
    if key is None:
        log.info("an admin key exists; this frontend made none (the key file %s is absent)",
                 key_file)
        return
    lines = ["", "=" * 78, "slora admin key (shown once; Redis keeps only its hash):", key]
    if key_file:
        os.makedirs(os.path.dirname(os.path.abspath(key_file)), exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        lines.append(f"also written to {key_file} (mode 0600), where the slora CLI reads it")
    lines += ["Make tenant keys with: slora keys create TENANT", "=" * 78, ""]
    print("\n".join(lines), flush=True)


def bind_public_port(server: grpc.aio.Server, args) -> int:
    """Listen on --host:--port, over TLS if configured; returns the port."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    if not args.tls_cert:
        if args.tls_client_ca:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return listen(server, "frontend", args.host, args.port)

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    client_ca = read(args.tls_client_ca) if args.tls_client_ca else None
    credentials = grpc.ssl_server_credentials(
        [(read(args.tls_key), read(args.tls_cert))], root_certificates=client_ca,
        require_client_auth=client_ca is not None)
    return listen(server, "frontend", args.host, args.port, credentials)
