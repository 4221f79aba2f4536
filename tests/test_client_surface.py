"""The SDK's two clients and the CLI offer one list of operations with one set of defaults,
and every flag of the CLI says what it does and shows its default."""
from __future__ import annotations

import argparse
import inspect

from slora.client import AsyncClient, Client
from slora.client.cli import CLI_OPERATIONS, build_parser
from slora.client.messages import (
    DEFAULT_MAX_NEW_TOKENS, GENERATE_DEFAULTS, OPERATIONS, admin_key_path, find_api_key,
)


def public_methods(cls) -> set[str]:
    return {name for name, _ in inspect.getmembers(cls, callable)
            if not name.startswith("_") and name != "close"}


def test_sync_and_async_clients_have_the_same_methods_and_signatures():
    """Client and AsyncClient have exactly OPERATIONS as public methods, each with the same
    parameters and defaults, each with a docstring; AsyncClient's are awaitable."""
    assert public_methods(Client) == set(OPERATIONS) == public_methods(AsyncClient)
    for name in OPERATIONS:
        sync, aio = getattr(Client, name), getattr(AsyncClient, name)
        assert inspect.signature(sync).parameters == inspect.signature(aio).parameters, name
        assert sync.__doc__ and aio.__doc__, name
        assert inspect.iscoroutinefunction(aio) or inspect.isasyncgenfunction(aio), name
    assert inspect.signature(Client.__init__).parameters.keys() == \
        inspect.signature(AsyncClient.__init__).parameters.keys()


def test_cli_reaches_every_operation():
    """Each command of CLI_OPERATIONS parses, and together they call every operation
    (generate is stream gathered)."""
    parser = build_parser()
    for command in CLI_OPERATIONS:
        words = [w for w in command if not w.startswith("--")]
        positionals = {("generate",): ["Hi"], ("adapters", "add"): ["id", "/tmp/x"],
                       ("adapters", "get"): ["id"], ("adapters", "rm"): ["id"],
                       ("keys", "create"): ["acme"], ("keys", "revoke"): ["k"],
                       ("demo-adapters",): ["3"]}.get(tuple(words), [])
        parser.parse_args([*words, *positionals, *[w for w in command if w.startswith("--")]])
    assert set(CLI_OPERATIONS.values()) | {"generate"} == set(OPERATIONS)


def _all_parsers(parser: argparse.ArgumentParser, path=("slora",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


def test_every_flag_has_help_and_generation_defaults_are_the_sdks():
    """Every argument of every command has help text; `generate --help` shows the one
    default max_new_tokens, which the SDK's docstring shows too."""
    num_checked = 0
    for path, parser in _all_parsers(build_parser()):
        if not parser.add_help:
            continue  # `slora worker ...` and the like: the service's own parser has the flags
        for action in parser._actions:
            if action.dest != "help" and not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{' '.join(path)} {action.option_strings or action.dest}"
                num_checked += 1
    assert num_checked > 50
    generate = dict(_all_parsers(build_parser()))[("slora", "generate")]
    text = generate.format_help()
    assert f"(default: {DEFAULT_MAX_NEW_TOKENS})" in " ".join(text.split()), text
    assert generate.get_default("max_new_tokens") == GENERATE_DEFAULTS["max_new_tokens"]
    assert f"max_new_tokens={DEFAULT_MAX_NEW_TOKENS}" in Client.generate.__doc__
    assert AsyncClient.stream.__doc__ == Client.stream.__doc__


def test_sdk_finds_the_key_as_the_cli_does(tmp_path, monkeypatch):
    """api_key= first, then $SLORA_API_KEY, then $SLORA_DATA_DIR/admin.key (default
    ~/.slora/admin.key); None when there is none."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SLORA_API_KEY", raising=False)
    monkeypatch.delenv("SLORA_DATA_DIR", raising=False)
    assert find_api_key() is None
    (tmp_path / ".slora").mkdir()
    (tmp_path / ".slora" / "admin.key").write_text("slora_file_key\n")
    assert admin_key_path() == str(tmp_path / ".slora" / "admin.key")
    assert find_api_key() == "slora_file_key"
    monkeypatch.setenv("SLORA_API_KEY", "slora_env_key")
    assert find_api_key() == "slora_env_key"
    assert find_api_key("slora_given") == "slora_given"
    monkeypatch.delenv("SLORA_API_KEY")
    monkeypatch.setenv("SLORA_DATA_DIR", str(tmp_path / "elsewhere"))
    assert find_api_key() is None
