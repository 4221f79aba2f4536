"""Security as a client meets it, on the whole stack as real processes (embedded valkey,
worker, scheduler, frontend on loopback, tiny model): API keys and tenants, adapter
visibility, per-tenant limits, safe adapter intake (roots, symlinks, sizes, safetensors
headers, NaN, pickle), and TLS / mTLS. One table holds every refusal with its status code;
after it the servers still serve."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import struct
import time
from dataclasses import dataclass, field

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers_peft import make_peft_adapter, make_tiny_llama
from helpers_procs import slora_module, start_process, stop_process
from helpers_stack import Stack, worker_argv
from slora.adapter_store.keys import new_key, parse_key
from slora.client import Client, SloraClientError
from slora.client.errors import from_rpc_error
from slora.client.messages import upload_chunks
from slora.v1 import adapters_pb2

MAX_UPLOAD_BYTES = 256 << 10
MAX_ADAPTERS_PER_TENANT = 3
MAX_REQUESTS_PER_TENANT = 2
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Code = grpc.StatusCode


@dataclass
class World:
    stack: Stack
    root_in: str
    """The frontend's only adapter root."""
    outside: str
    """A folder beside it, with a valid adapter in it."""
    good: str
    """A valid adapter under the root."""
    keys: dict[str, str] = field(default_factory=dict)
    """Tenant (or role) -> API key."""
    key_ids: dict[str, str] = field(default_factory=dict)

    def client(self, who: str, **kwargs) -> Client:
        key = {"nobody": ""}.get(who, self.keys.get(who, who))
        return self.stack.client(api_key=key, retries=0, **kwargs)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("security")
    base = make_tiny_llama(str(root / "base"), num_kv_heads=2, seed=5)
    root_in, outside = str(root / "adapters-in"), str(root / "outside")
    good = make_peft_adapter(base, os.path.join(root_in, "good"), r=4, seed=1)
    make_peft_adapter(base, os.path.join(outside, "good"), r=4, seed=2)
    # max_model_len 512: long streams for the concurrency test
    stack = Stack(str(root), base, worker_argv(base, max_model_len=512),
                  adapter_roots=[root_in], frontend_args=[
        "--max-upload-bytes", str(MAX_UPLOAD_BYTES),
        "--max-adapters-per-tenant", str(MAX_ADAPTERS_PER_TENANT),
        "--max-requests-per-tenant", str(MAX_REQUESTS_PER_TENANT)])
    stack.start_all()
    w = World(stack, root_in, outside, good)
    try:
        with stack.client() as admin:
            for tenant in ("alice", "bob", "carol", "dave", "erin", "revoked"):
                made = admin.create_key(tenant, description=f"{tenant}'s key")
                w.keys[tenant], w.key_ids[tenant] = made.secret, made.key.key_id
            admin.revoke_key(w.key_ids["revoked"])
        w.keys["admin"] = stack.admin_key
        with w.client("alice") as alice:
            alice.register_adapter("private", good)
            alice.register_adapter("shared", good, shared_with=["carol"])
            alice.register_adapter("open", good, public=True)
        yield w
    finally:
        stack.stop_all()


# ---- adapters made to be refused -------------------------------------------------------------

def copy_good(w: World, name: str, under: str | None = None) -> str:
    path = os.path.join(under or w.root_in, name)
    shutil.copytree(w.good, path, dirs_exist_ok=True)
    return path


def good_header(w: World) -> tuple[dict, bytes]:
    """The good adapter's safetensors header (parsed) and data section."""
    with open(os.path.join(w.good, WEIGHTS), "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_weights(w: World, name: str, make_bytes) -> str:
    """A folder under the root: the good config, and the weights `make_bytes(header, data)`
    returns (a header dict is serialized with its true length)."""
    path = copy_good(w, name)
    header, data = good_header(w)
    out = make_bytes(header, data)
    if isinstance(out, tuple):
        header, data = out
        raw = json.dumps(header).encode()
        out = struct.pack("<Q", len(raw)) + raw + data
    with open(os.path.join(path, WEIGHTS), "wb") as f:
        f.write(out)
    return path


def tensor_names(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"),
                  key=lambda k: header[k]["data_offsets"][0])


def bad_dtype(h, d):
    h[tensor_names(h)[0]]["dtype"] = "I64"
    return h, d


def bad_shape(h, d):
    h[tensor_names(h)[0]]["shape"][1] += 1
    return h, d


def offsets_past_end(h, d):
    h[tensor_names(h)[-1]]["data_offsets"][1] += 64
    return h, d


def overlapping(h, d):
    first, second = (h[n] for n in tensor_names(h)[:2])
    second["data_offsets"] = list(first["data_offsets"])
    second["shape"] = list(first["shape"])
    return h, d


def duplicate_name(h, d):
    raw = json.dumps(h)
    name = tensor_names(h)[0]
    dup = raw[:-1] + f', "{name}": ' + json.dumps(h[name]) + "}"
    raw = dup.encode()
    return struct.pack("<Q", len(raw)) + raw + d


CORRUPT_HEADERS = {
    "header length 2^62": lambda h, d: struct.pack("<Q", 1 << 62) + b"{}" + d,
    "header past the end": lambda h, d: struct.pack("<Q", len(d) + 4096) + b"{}" + d,
    "shorter than 8 bytes": lambda h, d: b"\x01\x02\x03",
    "header not JSON": lambda h, d: struct.pack("<Q", 9) + b"{not json" + d,
    "header a JSON list": lambda h, d: struct.pack("<Q", 2) + b"[]" + d,
    "integer dtype": bad_dtype,
    "shape not its byte span": bad_shape,
    "offsets past the end": offsets_past_end,
    "overlapping tensors": overlapping,
    "a name twice": duplicate_name,
    "a pickle named .safetensors": lambda h, d: b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00"
                                                b"}\x94\x8c\x01a\x94K\x01s.",
}
"""How each corrupt adapter_model.safetensors is made from the good one."""


def nan_weights(w: World) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    path = copy_good(w, "nan")
    tensors = load_file(os.path.join(path, WEIGHTS))
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, os.path.join(path, WEIGHTS))
    assert torch.isnan(load_file(os.path.join(path, WEIGHTS))[name]).any()
    return path


def pickle_by_path(w: World) -> str:
    path = copy_good(w, "pickled")
    os.rename(os.path.join(path, WEIGHTS), os.path.join(path, "adapter_model.bin"))
    return path


def symlinked_folder(w: World) -> str:
    link = os.path.join(w.root_in, "link-out")
    if not os.path.islink(link):
        os.symlink(os.path.join(w.outside, "good"), link)
    return link


def symlinked_weights(w: World) -> str:
    path = os.path.join(w.root_in, "half-link")
    os.makedirs(path, exist_ok=True)
    shutil.copy(os.path.join(w.good, CONFIG), path)
    link = os.path.join(path, WEIGHTS)
    if not os.path.islink(link):
        os.symlink(os.path.join(w.outside, "good", WEIGHTS), link)
    return path


def raw_upload(c: Client, chunks) -> adapters_pb2.Adapter:
    try:
        return c._adapters.Upload(iter(chunks), timeout=60, metadata=c._metadata)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


def oversized_upload(c: Client, w: World):
    chunks = list(upload_chunks("big", w.good, "big-1"))[:2]  # header, config
    piece = b"\0" * (64 << 10)
    chunks += [adapters_pb2.UploadAdapterChunk(chunk=adapters_pb2.FileChunk(
        file_name=WEIGHTS, data=piece))] * (MAX_UPLOAD_BYTES // len(piece) + 1)
    return raw_upload(c, chunks)


def pickle_upload(c: Client, w: World):
    chunks = list(upload_chunks("pickled-up", w.good, "pk-1"))[:2]
    chunks.append(adapters_pb2.UploadAdapterChunk(chunk=adapters_pb2.FileChunk(
        file_name="adapter_model.bin", data=b"\x80\x04K\x01.")))
    return raw_upload(c, chunks)


def keys_call(method: str):
    def call(c: Client, w: World):
        if method == "create":
            return c.create_key("mallory", admin=True)
        if method == "list":
            return c.list_keys()
        return c.revoke_key(w.key_ids["alice"])
    return call


def not_registered(ref: str) -> str:
    return f"adapter '{ref}' is not registered"


# (case, caller, call(client, world), status code, words the details hold)
TABLE = [
    # -- keys
    ("missing key", "nobody", lambda c, w: c.generate([5, 6]), Code.UNAUTHENTICATED,
     "missing API key"),
    ("missing key, adapters", "nobody", lambda c, w: c.list_adapters(), Code.UNAUTHENTICATED,
     "missing API key"),
    ("missing key, upload", "nobody", lambda c, w: c.upload_adapter("x", w.good),
     Code.UNAUTHENTICATED, "missing API key"),
    ("unknown key", new_key()[1], lambda c, w: c.generate([5, 6]), Code.UNAUTHENTICATED,
     "invalid API key"),
    ("not a key", "hunter2", lambda c, w: c.generate([5, 6]), Code.UNAUTHENTICATED,
     "invalid API key"),
    ("revoked key", "revoked", lambda c, w: c.generate([5, 6]), Code.UNAUTHENTICATED,
     "was revoked"),
    ("non-admin creates a key", "alice", keys_call("create"), Code.PERMISSION_DENIED,
     "needs an admin key"),
    ("non-admin lists keys", "bob", keys_call("list"), Code.PERMISSION_DENIED,
     "needs an admin key"),
    ("non-admin revokes a key", "bob", keys_call("revoke"), Code.PERMISSION_DENIED,
     "needs an admin key"),
    # -- another tenant's adapters: exactly as if they did not exist
    ("Get of another's private adapter", "bob", lambda c, w: c.get_adapter("alice/private"),
     Code.NOT_FOUND, not_registered("alice/private")),
    ("Generate with another's private adapter", "bob",
     lambda c, w: c.generate([5, 6], adapter_id="alice/private"), Code.NOT_FOUND,
     not_registered("alice/private")),
    ("Delete of another's private adapter", "bob",
     lambda c, w: c.delete_adapter("alice/private"), Code.NOT_FOUND,
     not_registered("alice/private")),
    ("another's id in one's own namespace", "bob", lambda c, w: c.get_adapter("private"),
     Code.NOT_FOUND, not_registered("private")),
    ("an adapter that does not exist", "bob", lambda c, w: c.get_adapter("alice/nope"),
     Code.NOT_FOUND, not_registered("alice/nope")),
    ("adapter shared with someone else", "bob",
     lambda c, w: c.generate([5, 6], adapter_id="alice/shared"), Code.NOT_FOUND,
     not_registered("alice/shared")),
    ("Delete of an adapter shared with the caller", "carol",
     lambda c, w: c.delete_adapter("alice/shared"), Code.PERMISSION_DENIED,
     "only its owner may delete it"),
    # -- registration by path
    ("path with .. out of the root", "alice",
     lambda c, w: c.register_adapter("trav", os.path.join(w.root_in, "..", "outside", "good")),
     Code.PERMISSION_DENIED, "outside the adapter roots"),
    ("path outside the root that does not exist", "alice",
     lambda c, w: c.register_adapter("trav2", os.path.join(w.outside, "nothing-here")),
     Code.PERMISSION_DENIED, "outside the adapter roots"),
    ("symlinked folder out of the root", "alice",
     lambda c, w: c.register_adapter("sym", symlinked_folder(w)), Code.PERMISSION_DENIED,
     "outside the adapter roots"),
    ("symlinked weights file out of the root", "alice",
     lambda c, w: c.register_adapter("symw", symlinked_weights(w)), Code.PERMISSION_DENIED,
     "outside the adapter roots"),
    ("relative path", "alice", lambda c, w: c.register_adapter("rel", "adapters-in/good"),
     Code.INVALID_ARGUMENT, "relative"),
    ("pickle by path", "alice", lambda c, w: c.register_adapter("pk", pickle_by_path(w)),
     Code.INVALID_ARGUMENT, "pickle adapters are refused"),
    ("NaN weights", "alice", lambda c, w: c.register_adapter("nan", nan_weights(w)),
     Code.INVALID_ARGUMENT, "NaN or Inf"),
    # -- uploads
    ("oversized upload", "alice", oversized_upload, Code.RESOURCE_EXHAUSTED,
     f"more than {MAX_UPLOAD_BYTES} bytes"),
    ("pickle upload", "alice", pickle_upload, Code.INVALID_ARGUMENT,
     "pickle adapters are refused"),
] + [
    (f"corrupt safetensors: {name}", "alice",
     lambda c, w, i=i, make=make: c.upload_adapter(f"bad-{i}",
                                                   with_weights(w, f"corrupt-{i}", make)),
     Code.INVALID_ARGUMENT, "not a readable safetensors file")
    for i, (name, make) in enumerate(CORRUPT_HEADERS.items())
]


@pytest.mark.parametrize("case, caller, call, code, words", TABLE, ids=[t[0] for t in TABLE])
def test_refusal_gets_its_status_code(world, case, caller, call, code, words):
    with world.client(caller) as c:
        with pytest.raises(SloraClientError) as err:
            call(c, world)
    assert err.value.code == code, f"{case}: {err.value}"
    assert words in err.value.details, f"{case}: {err.value.details}"


def test_after_the_table_the_servers_still_serve(world):
    """Every process is alive, health is SERVING, and each tenant still generates."""
    for name, proc in world.stack.procs.items():
        assert proc.poll() is None, f"{name} exited"
    with grpc.insecure_channel(f"127.0.0.1:{world.stack.ports['frontend']}") as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with world.client("alice") as alice:
        assert alice.generate([5, 6, 7], adapter_id="private", max_new_tokens=3).token_ids
        refs = {a.ref for a in alice.list_adapters()}
    assert {"alice/private", "alice/shared", "alice/open"} <= refs
    assert not refs & {"alice/trav", "alice/sym", "alice/symw", "alice/nan", "alice/big"}


def test_shared_and_public_adapters_reach_exactly_the_right_tenants(world):
    """Public: every tenant; shared: the named tenant; private: the owner. Lists show what
    each may use; only the owner sees whom an adapter is shared with; a tenant may register
    an id another tenant uses (ids are per tenant), and the two stay apart."""
    with world.client("carol") as carol, world.client("bob") as bob:
        assert carol.generate([5, 6], adapter_id="alice/shared", max_new_tokens=2).token_ids
        assert bob.generate([5, 6], adapter_id="alice/open", max_new_tokens=2).token_ids
        assert {a.ref for a in carol.list_adapters()} >= {"alice/shared", "alice/open"}
        bob_sees = {a.ref: a for a in bob.list_adapters()}
        assert "alice/open" in bob_sees and not {"alice/private", "alice/shared"} & set(bob_sees)
        mine = bob.register_adapter("private", world.good)
        assert (mine.owner, mine.ref) == ("bob", "bob/private")
        assert bob.get_adapter("private").owner == "bob"
        assert carol.get_adapter("alice/shared").shared_with == []
    with world.client("alice") as alice:
        assert list(alice.get_adapter("shared").shared_with) == ["carol"]
        assert alice.get_adapter("private").owner == "alice"


def test_tenant_adapter_quota_is_resource_exhausted(world):
    with world.client("dave") as dave:
        for i in range(MAX_ADAPTERS_PER_TENANT):
            dave.register_adapter(f"q{i}", world.good)
        with pytest.raises(SloraClientError) as err:
            dave.register_adapter("one-too-many", world.good)
        assert err.value.code == Code.RESOURCE_EXHAUSTED, err.value
        assert f"the limit is {MAX_ADAPTERS_PER_TENANT}" in err.value.details
        dave.delete_adapter("q0")
        dave.register_adapter("one-too-many", world.good)


def test_tenant_concurrency_limit_is_resource_exhausted_at_once(world):
    """With MAX_REQUESTS_PER_TENANT streams running, the tenant's next call is refused at
    once; another tenant is not affected; once the streams end the tenant is served again."""
    with world.client("erin") as erin, world.client("alice") as alice:
        streams = [erin.stream([5, 6 + i], max_new_tokens=400, ignore_eos=True)
                   for i in range(MAX_REQUESTS_PER_TENANT)]
        for s in streams:
            next(s)
        start = time.monotonic()
        with pytest.raises(SloraClientError) as err:
            erin.generate([5, 9], max_new_tokens=2)
        assert err.value.code == Code.RESOURCE_EXHAUSTED, err.value
        assert time.monotonic() - start < 2.0
        assert alice.generate([5, 9], max_new_tokens=2).token_ids
        for s in streams:
            s.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert erin.generate([5, 9], max_new_tokens=2).token_ids
                break
            except SloraClientError as e:
                assert e.code == Code.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)


def test_keys_are_stored_hashed_and_listed_without_secrets(world):
    """No key's clear text (nor its secret part) is anywhere in Redis; the Keys service
    lists key ids, tenants and flags, never a secret; revoking one key leaves the others."""
    client = redis.Redis.from_url(world.stack.redis_url)
    try:
        dump = b"".join(
            b"".join(client.hgetall(k).values()) if client.type(k) == b"hash" else
            b"".join(client.smembers(k)) if client.type(k) == b"set" else
            (client.get(k) or b"") if client.type(k) == b"string" else b""
            for k in client.scan_iter())
    finally:
        client.close()
    for who, key in world.keys.items():
        # The secret is URL-safe base64 and may hold "_": split the key as the server does.
        _, secret = parse_key(key)
        assert len(secret) == 43
        assert key.encode() not in dump and secret.encode() not in dump, \
            f"{who}'s key is in Redis in clear"
    with world.client("admin") as admin:
        listed = {k.key_id: k for k in admin.list_keys(include_revoked=True)}
        assert world.key_ids["revoked"] in listed and listed[world.key_ids["revoked"]].revoked_unix
        assert listed[world.key_ids["alice"]].tenant == "alice"
        assert world.key_ids["revoked"] not in {k.key_id for k in admin.list_keys()}
    with world.client("bob") as bob:
        assert bob.generate([5, 6], max_new_tokens=2).token_ids


# ---- TLS -------------------------------------------------------------------------------------

def make_ca(name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca, name: str, server: bool):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH if server
                    else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_pem(folder: str, name: str, key, cert) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    key_path, cert_path = os.path.join(folder, f"{name}.key"), os.path.join(folder, f"{name}.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pytest.importorskip("cryptography", reason="the TLS tests make certificates with it")
    folder = str(tmp_path_factory.mktemp("pki"))
    server_ca, client_ca, rogue_ca = make_ca("server CA"), make_ca("client CA"), make_ca("rogue")
    paths = {}
    for name, (key, cert) in {"server_ca": server_ca, "client_ca": client_ca,
                              "server": issue(server_ca, "slora", server=True),
                              "client": issue(client_ca, "alice", server=False),
                              "rogue": issue(rogue_ca, "alice", server=False)}.items():
        paths[f"{name}_key"], paths[name] = write_pem(folder, name, key, cert)
    return paths


def start_frontend(world: World, extra: list[str]):
    """A second frontend of the stack (same scheduler, Redis, store and admin key file)."""
    s = world.stack
    argv = slora_module("slora.frontend.server", "--port", "0",
                        "--scheduler-address", f"127.0.0.1:{s.ports['scheduler']}",
                        "--redis-url", s.redis_url, "--data-dir", os.path.join(s.root, "data"),
                        "--internal-secret-file", s.secret_file,
                        *s.frontend_args, *extra)
    proc, port = start_process(argv, "SLORA_READY", timeout=120)
    return proc, f"127.0.0.1:{port}"


def test_tls_port_serves_tls_clients_and_refuses_plaintext(world, pki):
    """A frontend with --tls-cert/--tls-key: a client trusting its CA generates (and still
    needs its API key); a plaintext client, or one trusting another CA, cannot connect."""
    proc, target = start_frontend(world, ["--tls-cert", pki["server"],
                                          "--tls-key", pki["server_key"]])
    key = world.keys["alice"]
    try:
        with Client(target, api_key=key, tls_ca=pki["server_ca"], retries=0) as c:
            assert c.generate([5, 6], adapter_id="private", max_new_tokens=2).token_ids
        with Client(target, api_key="", tls_ca=pki["server_ca"], retries=0) as c:
            with pytest.raises(SloraClientError) as err:
                c.generate([5, 6])
            assert err.value.code == Code.UNAUTHENTICATED
        for kwargs in (dict(), dict(tls_ca=pki["client_ca"])):
            with Client(target, api_key=key, retries=0, timeout_s=10, **kwargs) as c:
                with pytest.raises(SloraClientError) as err:
                    c.generate([5, 6])
                assert err.value.code == Code.UNAVAILABLE, (kwargs, err.value)
    finally:
        stop_process(proc)


def test_mtls_port_refuses_clients_without_a_certificate_of_its_ca(world, pki):
    """A frontend with --tls-client-ca: only a client certificate signed by that CA gets
    through; none, or one from another CA, fails the handshake (UNAVAILABLE)."""
    proc, target = start_frontend(world, ["--tls-cert", pki["server"],
                                          "--tls-key", pki["server_key"],
                                          "--tls-client-ca", pki["client_ca"]])
    common = dict(api_key=world.keys["alice"], tls_ca=pki["server_ca"], retries=0,
                  timeout_s=10)
    try:
        with Client(target, tls_cert=pki["client"], tls_key=pki["client_key"], **common) as c:
            assert c.generate([5, 6], adapter_id="private", max_new_tokens=2).token_ids
        for kwargs in (dict(), dict(tls_cert=pki["rogue"], tls_key=pki["rogue_key"])):
            with Client(target, **common, **kwargs) as c:
                with pytest.raises(SloraClientError) as err:
                    c.generate([5, 6])
                assert err.value.code == Code.UNAVAILABLE, (kwargs, err.value)
    finally:
        stop_process(proc)
