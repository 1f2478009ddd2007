"""The CLI against the in-process service: analyze with -o, manifests, manifest show."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
from typer.testing import CliRunner

from clients.cli.app import app
from clients.cli.context import Clients, set_clients
from services.common.config import ClientSettings
from services.manifest import jsonio
from conftest import TOKENS
from manifest.conftest import Harness


async def run(*args: str) -> tuple[int, str]:
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args))
    return result.exit_code, result.output


async def test_analyze_list_show(service: Harness, sample_copy: Path, tmp_path: Path) -> None:
    settings = ClientSettings(manifest_addr=f"127.0.0.1:{service.server.port}", token=TOKENS["operator"])
    cli_clients = Clients(settings)
    set_clients(cli_clients)
    try:
        out = tmp_path / "manifest.json"
        code, text = await run("analyze", str(sample_copy), "--case", "Smith v. Jones", "-o", str(out),
                               "--exclude-type", "video,audio", "--exclude", "**/drafts/**")
        assert code == 0, text
        assert "files: 11" in text and "need OCR: 3" in text
        assert "estimated cost" in text and "total" in text
        document = json.loads(out.read_bytes())
        jsonschema.validate(document, jsonio.schema())
        manifest_id = document["manifest_id"]
        code, text = await run("manifests")
        assert code == 0 and "Smith v." in text
        code, text = await run("manifests", "--json")
        assert code == 0 and [m["manifestId"] for m in json.loads(text)] == [manifest_id]
        code, text = await run("manifest", "show", manifest_id, "--files")
        assert code == 0 and "duplicate of" in text and "files not imported" in text
        code, text = await run("manifest", "show", manifest_id, "--json")
        assert code == 0 and json.loads(text)["manifest_id"] == manifest_id
        code, text = await run("analyze", "/etc", "--case", "X")
        assert code == 5 and "outside the source roots" in text
        code, text = await run("manifest", "show", "00000000-0000-0000-0000-000000000000")
        assert code == 4
    finally:
        set_clients(None)
        cli_clients.close()
