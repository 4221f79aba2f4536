"""The event loop of every slora process: uvloop where it is installed."""
from __future__ import annotations

import asyncio


def run_async(main):
    """Runs a coroutine to completion on uvloop, or asyncio's loop without it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
