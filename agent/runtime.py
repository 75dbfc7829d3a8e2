"""Build the running system from config and profile: store, knowledge base, tools, model, controller."""

from __future__ import annotations

import json
import os
import threading
from functools import cached_property, partial
from pathlib import Path

from agent.config import AgentConfig
from models.profiles import check_ready, load_profile
from models.specs import ProfileSpec

KB_SESSION = "knowledge-base"  # the media store's session for files ingested into the knowledge base


class Runtime:
    """Shared state lives under `config.data_dir` (SQLite), or in the configured Postgres database;
    heavy models load on first use, once."""

    def __init__(self, config: AgentConfig, profile: ProfileSpec | None = None, *, thinker=None, pool=None):
        """`thinker` and `pool`: the backbone and the expert models when they live elsewhere (Ray
        Serve deployments); by default both load in this process."""
        self.config = config
        self.profile = profile or load_profile(config.profile)
        check_ready(self.profile)
        from tools.database import Database, database_url
        from tools.media_store import MediaStore
        from tools.model_pool import default_pool

        self.data_dir = Path(config.data_dir).expanduser()
        url = database_url(config.database)
        self.database = Database(url) if url else None
        try:
            if self.database is not None:
                self.database.check()  # an older schema: refuse, and say `signalgraph db upgrade`
            self.bucket = self._media_bucket()
        except Exception:
            if self.database is not None:
                self.database.close()
            raise
        self.store = MediaStore(self.data_dir / "media", allowed_dirs=config.allowed_dirs, limits=self.profile.limits,
                                database=self.database, bucket=self.bucket)  # on Postgres, the folder only caches
        self.pool = pool or default_pool()
        self._thinker = thinker
        self._tools: dict[str, list] = {}
        self._knowledge_bases: dict[str | None, object] = {}
        self._kb_lock = threading.Lock()

    def _media_bucket(self):
        """The configured S3-compatible bucket for media bytes, checked to answer, or None."""
        url = self.config.media_bucket or os.environ.get("SIGNALGRAPH_MEDIA_BUCKET") or None
        if url is None:
            return None
        from tools.media_bucket import MediaBucket

        bucket = MediaBucket(url, endpoint_url=self.config.media_bucket_endpoint)
        bucket.check()
        return bucket

    @cached_property
    def knowledge_base(self):
        """The default tenant's knowledge base (None when the profile has no embedder)."""
        return self.knowledge_base_for(None)

    @cached_property
    def _embeddings(self):
        from tools.embeddings import MiniLMEmbeddings

        return self.pool.get("embedder", self.profile.embedder, MiniLMEmbeddings)

    def knowledge_base_for(self, tenant: str | None):
        """`tenant`'s own knowledge base: a collection on Postgres, a file of its own in SQLite."""
        if self.profile.embedder is None:
            return None
        with self._kb_lock:
            if tenant not in self._knowledge_bases:
                if self.database is not None:  # pgvector with an HNSW index, shared by every replica
                    from tools.knowledge_base_pg import PgKnowledgeBase

                    kb = PgKnowledgeBase(self.database, self._embeddings,
                                         collection="default" if tenant is None else f"tenant:{tenant}")
                else:
                    from tools.knowledge_base import KnowledgeBase

                    name = "knowledge.sqlite" if tenant is None else f"knowledge-{tenant}.sqlite"
                    kb = KnowledgeBase(self.data_dir / name, self._embeddings)
                self._knowledge_bases[tenant] = kb
            return self._knowledge_bases[tenant]

    @cached_property
    def api_keys(self):
        """Tenants' API keys, in the shared database or in keys.sqlite under the data folder."""
        from tools.tenants import open_keys

        return open_keys(self.database, self.data_dir)

    def tools(self, session: str) -> list:
        if session not in self._tools:
            from tools.expert_tools import ToolContext, build_tools, runnable_tools
            from tools.tenants import tenant_of

            tenant, own_id = tenant_of(session)
            knowledge_base = self.knowledge_base_for(tenant)
            context = ToolContext(session=session, profile=self.profile, store=self.store, pool=self.pool,
                                  output_dir=self.data_dir / "outputs", knowledge_base=knowledge_base)
            allow = self.config.tools_for(own_id)
            extra = {t.name: t for t in self.extra_tools}
            # no allowlist: the tools this profile can run (one without its model would only fail)
            built = build_tools(context, allow=runnable_tools(self.profile, knowledge_base) if allow is None
                                else [n for n in allow if n not in extra])
            self._tools[session] = built + [t for name, t in extra.items() if allow is None or name in allow]
        return self._tools[session]

    @cached_property
    def extra_tools(self) -> list:
        """The user's own tools named in the config's `extra_tools`."""
        from tools.registered import load_tools

        return load_tools(self.config.extra_tools)

    @cached_property
    def thinker(self):
        if self._thinker is not None:
            return self._thinker
        remote = self.config.backbone
        if remote is not None:
            import os

            from graphs.remote_thinker import OpenAIThinker

            key = os.environ.get(remote.api_key_env) if remote.api_key_env else None
            if remote.api_key_env and not key:
                from models.errors import ConfigError

                raise ConfigError(f"backbone.api_key_env names ${remote.api_key_env}, which is not set")
            return OpenAIThinker(remote.base_url, remote.model, api_key=key, max_new_tokens=self.config.max_new_tokens,
                                 timeout=remote.timeout, tool_calls=remote.tool_calls)
        from graphs.thinker import BackboneThinker, ConditioningCache
        from models.mmllm import MMLLM

        return BackboneThinker(MMLLM.from_profile(self.profile), ConditioningCache(),
                               max_new_tokens=self.config.max_new_tokens)

    @cached_property
    def controller(self):
        from graphs.controller import Controller
        from graphs.thinker import generate_media

        mm = getattr(self.thinker, "mm", None)
        # the output projectors' generators: in this process, or where the thinker's backbone runs
        generate = partial(generate_media, mm) if mm else getattr(self.thinker, "generate", None)
        return Controller(thinker=self.thinker, store=self.store, tools_for=self.tools, data_dir=self.data_dir,
                          knowledge_base_for=self._session_knowledge_base, generate=generate,
                          max_steps=self.config.max_steps, tool_timeout=self.config.tool_timeout,
                          retrieve_k=self.config.retrieve_k, history_turns=self.config.history_turns,
                          guard=self.config.guard, database=self.database)

    def _session_knowledge_base(self, session: str):
        from tools.tenants import tenant_of

        return self.knowledge_base_for(tenant_of(session)[0])

    # --- knowledge base ingestion: media go through the same tools a session uses ------------

    def _media_text(self, session: str, tool: str, argument: str, kind: str):
        from tools.expert_tools import call_tool

        def callback(path: Path) -> tuple[str, str]:
            record = self.store.add_file(session, path, kind)
            tools = {t.name: t for t in self.tools(session)}
            outcome = call_tool(tools[tool], {argument: record.id})
            if outcome.error:
                raise ValueError(outcome.error)
            result = outcome.artifact
            if "text" in result:
                return record.id, result["text"]
            return record.id, "Image showing " + ", ".join(label["label"] for label in result["labels"])

        return callback

    def ingest(self, paths: list[str], progress=None, *, tenant: str | None = None):
        """Files into `tenant`'s knowledge base (the default one without a tenant)."""
        from tools.ingest import ingest_paths
        from tools.tenants import check_tenant, scoped

        knowledge_base = self.knowledge_base_for(tenant if tenant is None else check_tenant(tenant))
        if knowledge_base is None:
            from models.errors import ConfigError

            raise ConfigError(f"profile {self.profile.name!r} has no embedder, so it has no knowledge base")
        session = scoped(tenant, KB_SESSION)
        names = {t.name for t in self.tools(session)}
        return ingest_paths(
            knowledge_base, paths, progress=progress,
            transcribe=self._media_text(session, "transcribe", "audio", "audio") if "transcribe" in names else None,
            describe=self._media_text(session, "describe_image", "image", "image") if "describe_image" in names
            else None,
        )

    def warm_up(self) -> None:
        """Do the first turn's one-time work before serving: the backbone's decode copy, the
        tool-call grammar of the default tool set, the embedder (when the knowledge base holds
        anything). A load balancer then sends the first user to a server whose first turn costs
        what any turn does."""
        from langchain_core.messages import HumanMessage

        from tools.expert_tools import tool_schemas

        session = "warm-up"  # its tools are built and dropped; nothing is stored for it
        try:
            knowledge_base = self.knowledge_base  # a turn embeds its query only when there is something to find
            if knowledge_base is not None and self.config.retrieve_k and knowledge_base.count():
                knowledge_base.embeddings.embed_query("warm-up")
            if self.config.backbone is None:  # an engine elsewhere warms itself
                self.thinker.think([HumanMessage("Hello")], tools=tool_schemas(self.tools(session)), passages=[],
                                   media=[], max_new_tokens=1)
        finally:
            self._tools.pop(session, None)

    def close(self) -> None:
        if "controller" in self.__dict__:
            self.controller.close()
        if "api_keys" in self.__dict__:
            self.api_keys.close()
        if self.database is not None:
            self.database.close()


def trace_lines(trace: list[dict]) -> list[str]:
    """The routing decisions of a turn, one short line each, for `--trace`."""
    lines = []
    for entry in trace:
        details = {k: v for k, v in entry.items() if k not in ("step", "time") and v not in (None, [], "", {})}
        lines.append(f"  {entry['step']:<9}{json.dumps(details, default=str)[:300]}")
    return lines
