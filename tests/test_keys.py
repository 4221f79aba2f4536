"""Spec of the API key store against a real embedded valkey: keys are salted scrypt hashes,
verified in constant time, revocable at once; the first-start admin key is made exactly once
however many frontends start together; a verified key outlives a short Redis outage."""
from __future__ import annotations

import asyncio

import pytest
import redis

from slora.adapter_store.embedded_redis import EmbeddedRedis
from slora.adapter_store.keys import (
    ADMIN_TENANT, KeyStore, key_hash_key, new_key, parse_key,
)
from slora.adapter_store.registry import connect
from slora.common.errors import (
    AuthenticationError, InvalidRequestError, KeyNotFoundError, LastAdminKeyError,
    RegistryUnavailableError,
)


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    with EmbeddedRedis(tmp_path_factory.mktemp("valkey-keys")) as server:
        yield server


@pytest.fixture
def url(valkey) -> str:
    with redis.Redis.from_url(valkey.url) as client:
        client.flushall()
    return valkey.url


def run(url: str, fn):
    async def main():
        client = connect(url)
        try:
            return await fn(KeyStore(client), client)
        finally:
            await client.aclose()
    return asyncio.run(main())


def test_a_key_is_its_tenants_and_redis_holds_only_a_salted_hash(url):
    async def fn(keys: KeyStore, client):
        record, key = await keys.create("alice", description="ci")
        assert (await keys.verify(key)) == record
        stored = await client.hgetall(key_hash_key(record.key_id))
        _, other_key = await keys.create("alice")
        other = await client.hgetall(key_hash_key(parse_key(other_key)[0]))
        return record, key, stored, other

    record, key, stored, other = run(url, fn)
    key_id, secret = parse_key(key)
    assert (record.key_id, record.tenant, record.admin) == (key_id, "alice", False)
    assert secret not in "".join(stored.values()) and key not in "".join(stored.values())
    assert stored["kdf"].startswith("scrypt") and len(bytes.fromhex(stored["hash"])) == 32
    assert stored["salt"] != other["salt"], "every key has its own salt"


@pytest.mark.parametrize("bad", ["", "Bearer", "slora_0123456789abcdef_short",
                                 new_key()[1], "slora_zz23456789abcdef_" + "a" * 43])
def test_malformed_unknown_or_wrong_keys_are_refused_alike(url, bad):
    async def fn(keys: KeyStore, client):
        _, key = await keys.create("alice")
        wrong_secret = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
        for candidate in (bad, wrong_secret):
            with pytest.raises(AuthenticationError, match="^invalid API key$"):
                await keys.verify(candidate)
    run(url, fn)


def test_revocation_applies_to_the_next_call_even_after_a_verified_call(url):
    async def fn(keys: KeyStore, client):
        _, admin = await keys.create(ADMIN_TENANT, admin=True)
        record, key = await keys.create("bob")
        await keys.verify(key)  # cached as verified
        await keys.revoke(record.key_id)
        with pytest.raises(AuthenticationError, match="was revoked"):
            await keys.verify(key)
        assert [k.key_id for k in await keys.list()] == [parse_key(admin)[0]]
        assert len(await keys.list(include_revoked=True)) == 2
        with pytest.raises(KeyNotFoundError):
            await keys.revoke("0123456789abcdef")
    run(url, fn)


def test_the_last_active_admin_key_cannot_be_revoked(url):
    async def fn(keys: KeyStore, client):
        first, _ = await keys.bootstrap_admin()
        with pytest.raises(LastAdminKeyError):
            await keys.revoke(first.key_id)
        second, _ = await keys.create("ops", admin=True)
        await keys.revoke(first.key_id)
        with pytest.raises(LastAdminKeyError):
            await keys.revoke(second.key_id)
    run(url, fn)


def test_frontends_starting_together_make_one_admin_key(url):
    """Eight concurrent first starts: one makes (and shows) the admin key, the others none;
    a later start with that key given stores nothing new."""
    async def fn(keys: KeyStore, client):
        made = await asyncio.gather(*(keys.bootstrap_admin() for _ in range(8)))
        shown = [key for _, key in made if key]
        again, none = await keys.bootstrap_admin(shown[0])
        return shown, again, none, await keys.list()

    shown, again, none, listed = run(url, fn)
    assert len(shown) == 1 and none is None
    assert [k.key_id for k in listed] == [again.key_id] and again.admin


def test_a_given_admin_key_is_stored_once_and_must_match(url):
    key_id, key = new_key()

    async def fn(keys: KeyStore, client):
        record, shown = await keys.bootstrap_admin(key)
        assert shown is None and record.admin and record.key_id == key_id
        assert (await keys.verify(key)).admin
        impostor = f"slora_{key_id}_" + "x" * 43
        with pytest.raises(AuthenticationError, match="another secret"):
            await keys.bootstrap_admin(impostor)
        with pytest.raises(InvalidRequestError):
            await keys.create("not a tenant!")
    run(url, fn)


def test_a_verified_key_outlives_a_redis_outage_and_others_get_unavailable(valkey, url):
    async def fn(keys: KeyStore, client):
        _, known = await keys.create("alice")
        _, unseen = await keys.create("bob")
        await keys.verify(known)
        valkey.stop()
        try:
            assert (await keys.verify(known)).tenant == "alice"
            with pytest.raises(RegistryUnavailableError):
                await keys.verify(unseen)
        finally:
            valkey.start()
    run(url, fn)


def test_a_burst_of_first_calls_with_one_key_pays_one_hash(url, monkeypatch):
    """100 concurrent first verifications of one key: every one succeeds, scrypt runs once
    (a wrong key in the same burst is still refused)."""
    import slora.adapter_store.keys as keys_module

    calls = []
    real = keys_module._scrypt
    monkeypatch.setattr(keys_module, "_scrypt", lambda *a: calls.append(1) or real(*a))

    async def fn(keys: KeyStore, client):
        _, key = await keys.create("alice")
        calls.clear()
        wrong = key[:-1] + ("A" if key[-1] != "A" else "B")
        results = await asyncio.gather(*(keys.verify(key) for _ in range(100)),
                                       keys.verify(wrong), return_exceptions=True)
        return results

    results = run(url, fn)
    assert all(r.tenant == "alice" for r in results[:100])
    assert isinstance(results[100], AuthenticationError)
    assert len(calls) == 2, "one hash for the key's burst, one for the wrong key"
