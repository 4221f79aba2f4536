"""Who owns an adapter and who may see it.

Adapter ids are namespaced per tenant: tenant `alice`'s adapter `acme` and tenant `bob`'s
adapter `acme` are two adapters, so registering an id never tells one tenant that another
uses it (no ALREADY_EXISTS across tenants, hence no existence leak on Register). Inside the
servers an adapter is known by its qualified id, `alice/acme` (just `acme` for NO_TENANT, the
owner when auth is off); neither tenant names nor adapter ids may hold `/`, so the split is
unambiguous. That qualified id is what the scheduler and the workers key adapters by.

A client names an adapter by a reference: `acme` means its own, `alice/acme` alice's. It sees
its own adapters, public ones and those shared with it by name; any other reference is
answered exactly like one that does not exist (NOT_FOUND, same message). Only the owner may
delete; a tenant that can see someone else's adapter and tries gets PERMISSION_DENIED.
"""
from __future__ import annotations

import re
from typing import Iterable

from slora.common.errors import InvalidRequestError

NO_TENANT = ""
"""The owner of adapters registered while auth is off (one anonymous tenant)."""
REF_SEPARATOR = "/"
TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_SHARED_WITH = 64
"""Most tenants one adapter may be shared with by name."""


def check_tenant(name: str, what: str = "tenant") -> None:
    if not isinstance(name, str) or not TENANT_RE.fullmatch(name):
        raise InvalidRequestError(
            f"{what} {name!r} is invalid: use 1 to 64 characters of A-Z a-z 0-9 . _ -")


def qualified_id(owner: str, adapter_id: str) -> str:
    """The id the servers know an adapter by."""
    return adapter_id if owner == NO_TENANT else f"{owner}{REF_SEPARATOR}{adapter_id}"


def split_ref(ref: str, tenant: str) -> tuple[str, str]:
    """(owner, adapter_id) of a client's reference: `id` is the caller's own."""
    if REF_SEPARATOR in ref:
        owner, adapter_id = ref.split(REF_SEPARATOR, 1)
        return owner, adapter_id
    return tenant, ref


def check_sharing(public: bool, shared_with: Iterable[str], owner: str) -> tuple[str, ...]:
    """The validated, sorted, de-duplicated tenants an adapter is shared with."""
    names = tuple(sorted(set(shared_with)))
    if len(names) > MAX_SHARED_WITH:
        raise InvalidRequestError(
            f"shared_with names {len(names)} tenants; at most {MAX_SHARED_WITH} (make the "
            "adapter public instead)")
    for name in names:
        check_tenant(name, "shared_with tenant")
    return tuple(n for n in names if n != owner)


def visible_to(owner: str, public: bool, shared_with: Iterable[str], tenant: str) -> bool:
    return owner == tenant or public or tenant in shared_with
