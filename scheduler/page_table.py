"""The scheduler's page table of the unified pool: which pages are free, and who holds
each other one (a request's KV cache or an adapter's rows). It never sees memory; the
worker owns that and writes where the step command says."""
from __future__ import annotations

from dataclasses import dataclass

FREE_PAGE = None
"""Owner of a free page."""


@dataclass(frozen=True)
class PageOwner:
    kind: str
    """"kv" or "adapter"."""
    key: str
    """The request id or the adapter id."""


class PageTable:
    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        # Popped from the end: the lowest page ids go out first, which keeps tests readable.
        self.free_page_ids: list[int] = list(range(num_pages - 1, -1, -1))
        self.page_owner: list[PageOwner | None] = [FREE_PAGE] * num_pages
        self.num_pages_by_kind = {"kv": 0, "adapter": 0}

    @property
    def num_free(self) -> int:
        return len(self.free_page_ids)

    def allocate(self, num: int, owner: PageOwner) -> list[int]:
        if num > len(self.free_page_ids):
            raise RuntimeError(f"page table: {num} pages asked, {self.num_free} free")
        page_ids = [self.free_page_ids.pop() for _ in range(num)]
        for p in page_ids:
            assert self.page_owner[p] is FREE_PAGE, f"page {p} allocated twice"
            self.page_owner[p] = owner
        self.num_pages_by_kind[owner.kind] += num
        return page_ids

    def free(self, page_ids: list[int], owner: PageOwner) -> None:
        for p in page_ids:
            assert self.page_owner[p] == owner, (
                f"page {p} freed by {owner} but held by {self.page_owner[p]}")
            self.page_owner[p] = FREE_PAGE
        self.free_page_ids.extend(reversed(page_ids))
        self.num_pages_by_kind[owner.kind] -= len(page_ids)

    def usage(self) -> dict[str, int]:
        return {"free": self.num_free, "kv": self.num_pages_by_kind["kv"],
                "adapter": self.num_pages_by_kind["adapter"], "total": self.num_pages}

    def check(self, expected: dict[PageOwner, list[int]]) -> None:
        """Invariants: every page is free or held by exactly the owner that says it holds
        it; `expected` maps each live owner to its pages."""
        seen = [FREE_PAGE] * self.num_pages
        for owner, page_ids in expected.items():
            for p in page_ids:
                assert seen[p] is FREE_PAGE, f"page {p} held by {seen[p]} and {owner}"
                seen[p] = owner
        assert seen == self.page_owner, "page owners disagree with requests and adapters"
        free = set(self.free_page_ids)
        assert len(free) == len(self.free_page_ids), "a page is on the free list twice"
        assert free == {p for p, o in enumerate(self.page_owner) if o is FREE_PAGE}
        assert self.num_pages_by_kind["kv"] + self.num_pages_by_kind["adapter"] + len(free) \
            == self.num_pages
