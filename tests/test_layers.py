"""The layer rules of DESIGN.md §9, checked on the imports of every module under ``voicegrow/``.

Read from the source (AST), so an import inside a function counts as much as one at the top; and
followed through voicegrow's own modules, so a rule cannot be dodged by importing a neighbour that
breaks it. ``docs/architecture.md`` draws the layers; a failure names the chain of imports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "voicegrow"

#: What no sans-IO code may touch: event loops, sockets, the network.
IO_MODULES = ("trio", "trio_websocket", "trio_mysql", "socket", "ssl", "selectors", "asyncio", "anyio",
              "httpx", "minio", "redis", "urllib3", "sqlite3")

#: The pipeline stages (``pipeline/``: VAD, ASR with its guards and model resolution, LLM, sentences, TTS,
#: text normalisation) and the top-level helpers they share (audio, Opus, language detection).
STAGES = ("voicegrow.pipeline", "voicegrow.audio", "voicegrow.opus", "voicegrow.language")

#: The HTTP side (``http/``): health, metrics, admin, console and the audio APIs, the xiaozhi OTA endpoint.
HTTP = ("voicegrow.http",)

#: Wiring: builds everything, so nothing below it may import it.
WIRING = ("voicegrow.services", "voicegrow.app", "voicegrow.cli", "voicegrow.workers")

#: Known breaches, each with the reason it stands and what removes it: (importer, imported) -> reason.
#: None today: services.py -> streaming.registry went away when #18 moved the registry to ``sessions/``.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(root: Path, dotted: str) -> bool:
    where = root.parent / Path(*dotted.split("."))
    return where.with_suffix(".py").exists() or (where / "__init__.py").exists()


def imports_of(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module ``path`` imports, absolute, wherever in the file the import stands."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from voicegrow.streaming import registry`` imports a module, not a name
            found.update(f"{module}.{alias.name}" for alias in node.names
                         if _is_module(root, f"{module}.{alias.name}"))
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(path, root): imports_of(path, root) for path in sorted(root.rglob("*.py"))}


def within(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def breaches(graph: dict[str, set[str]], importers: Iterable[str], forbidden: Iterable[str], *,
             follow: bool = True, allowed: Iterable[str] = ()) -> list[str]:
    """``a -> b -> c`` for each module in ``importers`` that reaches a ``forbidden`` one.

    ``follow`` walks through voicegrow's own modules (the rule holds for everything a layer loads);
    the walk stops at an :data:`EXCEPTIONS` edge and at the ``allowed`` modules."""
    importers, forbidden, allowed = tuple(importers), tuple(forbidden), tuple(allowed)
    found: list[str] = []
    for start in sorted(m for m in graph if within(m, importers)):
        seen = {start}
        stack = [(start, [start])]
        while stack:
            module, chain = stack.pop()
            for target in sorted(graph.get(module, ())):
                if (module, target) in EXCEPTIONS or within(target, allowed):
                    continue
                if within(target, forbidden) and not within(target, importers):
                    found.append(" -> ".join([*chain, target]))
                elif follow and target in graph and target not in seen and not within(target, importers):
                    seen.add(target)
                    stack.append((target, [*chain, target]))
    return found


def assert_none(found: list[str]) -> None:
    assert not found, "layer rule broken (DESIGN.md §9, docs/architecture.md):\n  " + "\n  ".join(found)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_every_module_and_resolves_relative_imports(graph: dict[str, set[str]]) -> None:
    assert {"voicegrow.protocol.native", "voicegrow.streaming.native", "voicegrow.storage.spool",
            "voicegrow.pipeline.vad", "voicegrow.pipeline.asr", "voicegrow.http.api", "voicegrow.http.web.routes"} <= graph.keys()
    assert "voicegrow.protocol.errors" in graph["voicegrow.protocol.native"]
    # an exception whose import is gone must go too, or it would hide the next breach
    assert [edge for edge in EXCEPTIONS if edge[1] not in graph.get(edge[0], set())] == []


def test_protocol_is_sans_io_and_knows_nothing_above_it(graph: dict[str, set[str]]) -> None:
    """Codecs and protocol state machines: no event loop, no socket, no other voicegrow layer."""
    assert_none(breaches(graph, ["voicegrow.protocol"], IO_MODULES))
    above = [m for m in graph if m != "voicegrow" and not within(m, ["voicegrow.protocol"])]  # "voicegrow": __version__
    assert_none(breaches(graph, ["voicegrow.protocol"], above))


def test_pipeline_stages_import_no_session_storage_http_or_wiring(graph: dict[str, set[str]]) -> None:
    assert_none(breaches(graph, STAGES, ["voicegrow.streaming", "voicegrow.storage", *HTTP, *WIRING]))


def test_storage_knows_nothing_of_sessions_http_or_wiring(graph: dict[str, set[str]]) -> None:
    assert_none(breaches(graph, ["voicegrow.storage"], ["voicegrow.streaming", *HTTP, *WIRING]))


def test_services_and_the_session_registry_sit_below_the_drivers(graph: dict[str, set[str]]) -> None:
    """Process-wide state (services, the live-session registry) is read by HTTP and shutdown alike, so
    it may not live in, or lean on, the per-connection package."""
    assert_none(breaches(graph, ["voicegrow.services", "voicegrow.sessions"], ["voicegrow.streaming", *HTTP]))
    assert_none(breaches(graph, ["voicegrow.sessions"], ["voicegrow.storage", *WIRING]))


def test_http_never_reaches_into_a_driver(graph: dict[str, set[str]]) -> None:
    """HTTP reads services and the session registry (``sessions/``); drivers and the session core are not its
    business, not even through services."""
    assert_none(breaches(graph, HTTP, ["voicegrow.streaming"]))


def test_a_planted_breach_is_caught(tmp_path: Path) -> None:
    """The checker itself: an import of trio in a codec is found, through a neighbour too."""
    root = tmp_path / "voicegrow"
    (root / "protocol").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "protocol" / "__init__.py").write_text("")
    (root / "protocol" / "codec.py").write_text("from . import helper\n")
    (root / "protocol" / "helper.py").write_text("def f():\n    import voicegrow.clock\n")
    (root / "clock.py").write_text("import trio\n")
    assert breaches(import_graph(root), ["voicegrow.protocol"], IO_MODULES) == [
        "voicegrow.protocol.helper -> voicegrow.clock -> trio"]


def test_a_planted_pipeline_breach_is_caught(tmp_path: Path) -> None:
    """A stage that reaches the session core, storage or HTTP, even lazily and through a helper, is found."""
    root = tmp_path / "voicegrow"
    for package in ("pipeline", "streaming", "storage", "http"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "pipeline" / "tts.py").write_text("def speak():\n    from voicegrow import helper\n")
    (root / "pipeline" / "asr.py").write_text("from voicegrow.storage import blobs\n")
    (root / "storage" / "blobs.py").write_text("")
    (root / "helper.py").write_text("from voicegrow.streaming.turn import Turn\nimport voicegrow.http.api\n")
    (root / "streaming" / "turn.py").write_text("")
    (root / "http" / "api.py").write_text("")
    assert sorted(breaches(import_graph(root), STAGES, ["voicegrow.streaming", "voicegrow.storage", *HTTP])) == [
        "voicegrow.pipeline.asr -> voicegrow.storage",
        "voicegrow.pipeline.asr -> voicegrow.storage.blobs",
        "voicegrow.pipeline.tts -> voicegrow.helper -> voicegrow.http.api",
        "voicegrow.pipeline.tts -> voicegrow.helper -> voicegrow.streaming.turn"]
