"""Tenants: their keys (made, listed, revoked, stored only hashed) and their isolation through the
real HTTP API: the same session id from two tenants names two sessions, and one tenant's
sessions, media and knowledge base are not found by another.

The turns run on the project's ScriptedThinker (the test is about who sees what, not the model);
the key store, controller, media store, knowledge base (real MiniLM embeddings) and server are real.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import httpx
import openai
import pytest
from PIL import Image

from agent.config import AgentConfig
from agent.runtime import Runtime
from agent.server.app import create_app
from graphs.scripted import ScriptedThinker
from graphs.thinker import ThinkResult
from tools.tenants import ApiKeys, TenantError, scoped, tenant_of

MODEL = "signalgraph-tiny"


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def png_data_url(colour=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_keys_are_made_listed_revoked_and_stored_only_as_hashes(tmp_path):
    keys = ApiKeys(path=tmp_path / "keys.sqlite")
    record, key = keys.add("acme", "ops team")
    other, _ = keys.add("globex")
    assert key.startswith("sg-") and len(key) > 40 and keys.lookup(key)[0] == "acme"
    assert keys.lookup(key + "x")[0] is None and keys.lookup("")[0] is None
    listed = [(k.id, k.tenant, k.name) for k in keys.list()]
    assert listed == [(record.id, "acme", "ops team"), (other.id, "globex", "")]
    keys.close()
    assert key.encode() not in (tmp_path / "keys.sqlite").read_bytes()  # only its SHA-256 is kept

    keys = ApiKeys(path=tmp_path / "keys.sqlite")  # another process on the same file
    assert keys.revoke(record.id).revoked is not None
    assert keys.lookup(key)[0] is None and keys.lookup("")[1]
    with pytest.raises(TenantError, match="revoked already"):
        keys.revoke(record.id)
    with pytest.raises(TenantError, match="keys list"):
        keys.revoke("nope")
    for bad in ("", "Acme", "a/b", "-x", "x" * 64):
        with pytest.raises(TenantError, match="tenant name"):
            keys.add(bad)


def test_threads_keep_tenants_apart_and_the_default_tenant_unchanged():
    assert scoped(None, "s1") == "s1" and tenant_of("s1") == (None, "s1")
    assert scoped("acme", "s1") == "acme/s1" and tenant_of("acme/s1") == ("acme", "s1")
    assert scoped("acme", "s1") != scoped("globex", "s1")


@pytest.fixture
def tenants(tmp_path, tiny_profile, running):
    """A server with two tenants' keys and the server's own key; yields (url, keys, thinker, runtime)."""
    from models.profiles import load_profile

    profile = tiny_profile.model_copy(update={"embedder": load_profile("local").embedder})
    thinker = ScriptedThinker()
    runtime = Runtime(AgentConfig(data_dir=tmp_path / "data", allowed_dirs=[tmp_path]), profile, thinker=thinker)
    made = {name: runtime.api_keys.add(name)[1] for name in ("acme", "globex")}
    with running(create_app(runtime, api_key="server-key")) as url:
        yield url, made, thinker, runtime
    runtime.close()


def test_the_same_session_id_names_two_sessions_and_nothing_crosses(tenants, tmp_path):
    url, keys, thinker, runtime = tenants
    acme, globex = client(url, keys["acme"]), client(url, keys["globex"])
    thinker.script = [ThinkResult("Noted, Ada."), ThinkResult("Noted, Bob.")]
    acme.chat.completions.create(model=MODEL, user="s1", messages=[{"role": "user", "content": [
        {"type": "text", "text": "My name is Ada; here is my logo."},
        {"type": "image_url", "image_url": {"url": png_data_url()}}]}])
    reply = globex.chat.completions.create(model=MODEL, user="s1",
                                           messages=[{"role": "user", "content": "My name is Bob."}])
    assert reply.model_extra["signalgraph"]["session"] == "s1"
    # globex's turn saw its own history only, and no media
    assert [m.text for m in thinker.seen[1]["messages"]] == ["My name is Bob."] and thinker.seen[1]["media"] == []

    def history(key: str, session: str = "s1") -> list[tuple[str, str]]:
        response = httpx.get(f"{url}/v1/sessions/{session}", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
        return [(t["user"], t["assistant"]) for t in response.json()["turns"]]

    ((said, answer),) = history(keys["acme"])
    assert said.startswith("My name is Ada") and answer == "Noted, Ada."
    assert history(keys["globex"]) == [("My name is Bob.", "Noted, Bob.")]
    assert history("server-key") == []  # the default tenant has no s1 either

    def media(key: str) -> int:
        return httpx.get(f"{url}/v1/media/s1/image-1", headers={"Authorization": f"Bearer {key}"}).status_code

    assert media(keys["acme"]) == 200
    assert media(keys["globex"]) == 404 and media("server-key") == 404
    # nor by naming the thread itself: a session id in a path holds no '/', even encoded
    for route in ("/v1/media/acme%2Fs1/image-1", "/v1/sessions/acme%2Fs1"):
        response = httpx.get(f"{url}{route}", headers={"Authorization": "Bearer server-key"})
        assert response.status_code == 404 or response.json()["turns"] == [], route


def test_each_tenant_retrieves_from_its_own_knowledge_base(tenants, tmp_path):
    url, keys, thinker, runtime = tenants
    note = tmp_path / "offsite.md"
    note.write_text("The acme spring offsite is in Lisbon on the 14th of May, at the riverside hotel.")
    report = runtime.ingest([str(note)], tenant="acme")
    assert report.chunks_added == 1
    thinker.script = [ThinkResult("Lisbon."), ThinkResult("I don't know.")]
    question = [{"role": "user", "content": "Where is the spring offsite?"}]
    client(url, keys["acme"]).chat.completions.create(model=MODEL, user="q", messages=question)
    client(url, keys["globex"]).chat.completions.create(model=MODEL, user="q", messages=question)
    assert "Lisbon" in thinker.seen[0]["passages"][0]["text"]
    assert thinker.seen[1]["passages"] == []
    assert runtime.knowledge_base.count() == 0  # the default tenant's is untouched


def test_keys_guard_every_route_and_a_revoked_key_stops_at_once(tenants):
    url, keys, thinker, runtime = tenants
    thinker.script = [ThinkResult("hello")]
    for route in ("/v1/models", "/v1/sessions/s1", "/v1/media/s1/image-1"):
        assert httpx.get(f"{url}{route}").json()["error"]["code"] == "missing_api_key"
        wrong = httpx.get(f"{url}{route}", headers={"Authorization": "Bearer sg-guess"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert client(url, "server-key").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]).choices[0].message.content == "hello"
    acme_id = next(k.id for k in runtime.api_keys.list() if k.tenant == "acme")
    runtime.api_keys.revoke(acme_id)
    with pytest.raises(openai.AuthenticationError):
        client(url, keys["acme"]).models.list()
    assert client(url, keys["globex"]).models.list().data[0].id == MODEL


def test_a_server_with_tenant_keys_is_closed_without_its_own_key(tmp_path, tiny_profile, running):
    runtime = Runtime(AgentConfig(data_dir=tmp_path / "data"), tiny_profile, thinker=ScriptedThinker())
    with running(create_app(runtime)) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 200  # open: no keys yet
        _, key = runtime.api_keys.add("acme")
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    runtime.close()


def test_keys_on_postgres_are_shared_by_every_replica(database):
    first, second = ApiKeys(database=database), ApiKeys(database=database)
    record, key = first.add("acme")
    assert second.lookup(key)[0] == "acme"
    second.revoke(record.id)
    assert first.lookup(key)[0] is None and not first.lookup("")[1]
    with database.connection() as conn:
        stored = conn.execute("SELECT key_sha256 FROM api_keys").fetchone()["key_sha256"]
    assert key not in stored and len(stored) == 64


def test_the_keys_command(tmp_path):
    config = tmp_path / "signalgraph.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\n")

    def keys(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "agent.cli.main", "--config", str(config), "keys", *args],
                              capture_output=True, text=True, timeout=120)

    added = keys("add", "acme", "--name", "ops")
    assert added.returncode == 0, added.stderr
    key_id, key = added.stdout.split()[1], added.stdout.split()[5]
    assert key.startswith("sg-") and "only time" in added.stdout
    listed = keys("list")
    assert key_id in listed.stdout and "acme" in listed.stdout and "active" in listed.stdout
    assert key not in listed.stdout
    assert keys("revoke", key_id).returncode == 0 and "revoked" in keys("list").stdout
    for args, message in ((("revoke", "nope"), "no key 'nope'"), (("add", "Not A Name"), "tenant name")):
        failed = keys(*args)
        assert failed.returncode == 2 and "Traceback" not in failed.stderr
        (line,) = failed.stderr.strip().splitlines()
        assert message in line
