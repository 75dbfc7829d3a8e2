"""The agent's own settings (which profile, where data lives, which tools each session may use).

Read from `--config FILE`, else $SIGNALGRAPH_CONFIG, else ./signalgraph.yaml if present, else defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.assets import home
from models.config_files import problems, read_mapping
from models.errors import ConfigError


class RemoteBackbone(BaseModel):
    """The backbone on an OpenAI-compatible engine instead of the profile's local MM-LLM."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["openai"] = "openai"
    base_url: str  # e.g. http://gpu-host:8000/v1
    model: str  # the engine's model name
    api_key_env: str | None = None  # the environment variable that holds its API key, if it needs one
    timeout: float = Field(120.0, gt=0)
    # native: the engine's function calling; schema: the call as JSON under the tools' schema
    # (response_format), for engines whose structured outputs hold where their tool calls do not
    tool_calls: Literal["native", "schema"] = "native"


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str | None = None  # name or YAML path; default $SIGNALGRAPH_PROFILE or local
    data_dir: Path = Field(default_factory=lambda: home() / "data")  # sessions, media, knowledge base
    # a postgresql:// URL: sessions, knowledge base, workflow runs and media in one database that any
    # number of processes share (docs/scaling.md); default $SIGNALGRAPH_DATABASE_URL, else SQLite in data_dir
    database: str | None = None
    # with a database: the bytes of new media in an S3-compatible bucket (s3://BUCKET/PREFIX), the
    # ids staying in the database; default $SIGNALGRAPH_MEDIA_BUCKET. Credentials from AWS_* variables
    media_bucket: str | None = None
    media_bucket_endpoint: str | None = None  # e.g. http://minio:9000; default AWS's (or $AWS_ENDPOINT_URL)
    # folders whose files users may attach; anything else (../ included) is refused
    allowed_dirs: list[Path] = Field(default_factory=lambda: [Path.cwd()])
    tools: list[str] | None = None  # the default allowlist; None allows every tool
    session_tools: dict[str, list[str]] = {}  # per-session allowlists, by session name
    # tools of your own, as "package.module:attribute" naming a LangChain tool (or a list of them);
    # declare what they do in tool.metadata ({"effect": "reads"|"acts", "intent": regex, "confirm":
    # bool}); a tool that declares nothing is treated as acting on the world and asks before it runs
    extra_tools: list[str] = []
    # the injection defences (docs/security.md); off only to measure what they stop
    guard: bool = True
    max_steps: int = Field(3, ge=1, le=10)  # think -> act rounds per turn
    tool_timeout: float = Field(120.0, gt=0)
    retrieve_k: int = Field(3, ge=0)
    history_turns: int = Field(4, ge=1)  # user turns of history the backbone sees
    max_new_tokens: int | None = None
    # the controller's backbone on an OpenAI-compatible engine (vLLM, SGLang, llama.cpp, a hosted API):
    # tools through its function calling; the profile's projectors and signal tokens are then unused
    backbone: RemoteBackbone | None = None

    def tools_for(self, session: str) -> list[str] | None:
        return self.session_tools.get(session, self.tools)


def load_config(path: str | None = None) -> AgentConfig:
    path = path or os.environ.get("SIGNALGRAPH_CONFIG")
    if path is None and Path("signalgraph.yaml").exists():
        path = "signalgraph.yaml"
    if path is None:
        return AgentConfig()
    file = Path(path).expanduser()
    data = read_mapping(file, "agent config")
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config {str(file)!r} is invalid: {problems(exc)}") from None
