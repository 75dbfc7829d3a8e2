"""`signalgraph chat`, `ask`, `kb` and `sessions`: the controller as a person uses it."""

from __future__ import annotations

import json
import sys
import time

from agent.config import load_config
from agent.runtime import Runtime, trace_lines
from models.errors import ConfigError, SignalgraphError

ATTACH = {"/image": "image", "/audio": "audio", "/video": "video"}


def _runtime(args) -> Runtime:
    config = load_config(args.config)
    if args.profile:
        config.profile = args.profile
    return Runtime(config)


def _show(result, trace: bool) -> None:
    for notice in result.notices:
        print(f"  ! {notice}")
    if result.citations:
        print(f"  sources: {', '.join(result.citations)}")
    for item in result.media:
        print(f"  [{item['kind']}] {item['id']}: {item['path']}")
    if trace:
        print("\n".join(trace_lines(result.trace)))


def chat(args) -> int:
    runtime = _runtime(args)
    session = args.session
    pending: list[dict] = []
    print(f"session {session!r} (profile {runtime.profile.name}); attach with /image, /audio, /video PATH; "
          "/quit to leave", flush=True)
    state = runtime.controller.state(session)
    if state.get("messages"):
        print(f"(resuming: {len(state['messages'])} messages so far)")
    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                continue
            command, _, rest = line.partition(" ")
            if command == "/quit":
                break
            if command in ATTACH:
                try:
                    pending.append(_attach(runtime, session, ATTACH[command], rest.strip()))
                except SignalgraphError as exc:  # said now, and nothing is sent with the next message
                    print(f"  ! not attached: {exc}")
                    continue
                print(f"  (will attach {rest.strip()} to your next message as {pending[-1]['media_id']})")
                continue
            print("assistant> ", end="", flush=True)
            result = runtime.controller.turn(session, line, pending,
                                             on_text=lambda text: print(text, end="", flush=True))
            print()
            _show(result, args.trace)
            pending = []
    finally:
        runtime.close()
    return 0


def _attach(runtime: Runtime, session: str, kind: str, path: str) -> dict:
    """The user's own file, read wherever they can read it and validated now: a file that cannot be
    attached raises (the CLI exits 2 with the reason) before any turn runs."""
    record = runtime.store.add_file(session, path, kind, confine=False)
    return {"media_id": record.id}


def ask(args) -> int:
    runtime = _runtime(args)
    session = args.session or f"ask-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6}"
    stream = None if args.json else (lambda text: print(text, end="", flush=True))
    try:
        attachments = [_attach(runtime, session, kind, path) for kind in ("image", "audio", "video")
                       for path in getattr(args, kind) or []]
        result = runtime.controller.turn(session, args.question, attachments, on_text=stream)
        if result.pending is not None:
            result = _confirm(runtime, result, args, stream)
    finally:
        runtime.close()
    if args.json:
        print(json.dumps({"session": result.session, "text": result.text, "media": result.media,
                          "citations": result.citations, "notices": result.notices, "pending": result.pending,
                          "trace": result.trace}, indent=2, default=str))
    else:
        print()
        _show(result, args.trace)
    return 0


def _confirm(runtime: Runtime, result, args, stream):
    """An action that needs the user's yes: --yes gives it, a terminal asks, and otherwise it waits in
    the session for `signalgraph ask --session NAME yes` (or no)."""
    if args.yes:
        approve = True
    elif sys.stdin.isatty() and not args.json:
        print(f"\n{result.text}")
        approve = input("  [y/N] ").strip().lower() in ("y", "yes")
    else:
        result.notices.append(f"waiting for your answer: signalgraph ask --session {result.session} yes (or no)")
        return result
    if stream:
        print("assistant> ", end="", flush=True)
    return runtime.controller.resume(result.session, approve=approve, on_text=stream)


def kb(args) -> int:
    runtime = _runtime(args)
    if args.action == "add":
        from tqdm import tqdm

        bar = tqdm(desc="ingesting", unit="file")
        report = runtime.ingest(args.paths, progress=lambda path: (bar.set_postfix_str(path.name), bar.update()),
                                tenant=args.tenant)
        bar.close()
        print(report.summary())
        return 0 if not report.skipped or report.chunks_added else 1
    from tools.tenants import check_tenant

    knowledge_base = runtime.knowledge_base_for(args.tenant if args.tenant is None else check_tenant(args.tenant))
    if knowledge_base is None:
        raise ConfigError(f"profile {runtime.profile.name!r} has no embedder, so it has no knowledge base")
    hits = knowledge_base.similarity_search_with_score(args.query, k=args.k)
    if not hits:
        print("no passages; add some with `signalgraph kb add PATH...`")
    for rank, (doc, score) in enumerate(hits, 1):
        where = f"{doc.metadata.get('source')}#{doc.metadata.get('position')}"
        media = f" (media {doc.metadata['media']})" if doc.metadata.get("media") else ""
        print(f"{rank}. [{score:.3f}] {where}{media}\n   {doc.page_content[:200]!r}")
    return 0


def sessions(args) -> int:
    runtime = _runtime(args)
    controller = runtime.controller
    if args.action == "delete":
        if args.name not in controller.sessions():
            raise ConfigError(f"there is no session called {args.name!r}; see `signalgraph sessions`")
        controller.delete_session(args.name)
        print(f"deleted session {args.name!r}")
        return 0
    for name in controller.sessions():
        state = controller.state(name)
        print(f"{name}\t{len(state.get('messages', []))} messages")
    return 0
