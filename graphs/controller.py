"""One conversational turn as a LangGraph graph, and the sessions it persists.

    ingest -> retrieve -> think -> gate -> act (parallel, one per tool call) -> collect -> think ...
                                \\-> generate (signal spans -> output projector -> generator) -> respond
                                 \\-> respond

Tool calls go to expert tools (the survey's "tool usage" axis); signal spans go to the model's
own output projectors and generators ("end-to-end"). Every decision lands in the trace, which is
persisted with the session.

What the agent reads (passages, tool results) is data, never instructions: it enters the prompt
neutralised (tools/untrusted.py), and the gate runs only the calls the user's own request allows
(graphs/tool_policy.py), pausing for the user's yes or no before a tool that needs confirmation.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, Send, interrupt

from graphs import tool_policy
from graphs.capabilities import asks_capabilities, describe
from graphs.reply import PlainLinkStream, ProseGate, compose, plain_links
from graphs.state import TurnState
from graphs.thinker import Thinker
from models.errors import SignalgraphError
from tools.expert_tools import call_tool, tool_schemas
from tools.untrusted import neutralise, redact


@dataclass
class TurnResult:
    session: str
    text: str
    media: list[dict]  # generated this turn: {"id", "kind", "path"}
    trace: list[dict]  # this turn's routing decisions and tool calls
    citations: list[str]  # sources of the passages retrieval gave the backbone, e.g. "notes.md#2"
    notices: list[str]  # what the user must be told besides the reply (e.g. a refused attachment)
    usage: dict = field(default_factory=dict)  # tokens the backbone read and wrote, all think rounds summed
    finish_reason: str = "stop"  # "length" when the reply stopped at the token limit
    # a tool call waiting for the user's yes or no: {"tool", "args", "question"}; the reply asks it
    pending: dict | None = None


def _entry(step: str, **details) -> dict:
    return {"step": step, "time": round(time.time(), 3), **details}


class Controller:
    """Runs turns for isolated, persistent sessions."""

    def __init__(self, *, thinker: Thinker, store, tools_for: Callable[[str], list], data_dir: Path,
                 knowledge_base=None, knowledge_base_for: Callable | None = None,
                 generate: Callable | None = None, max_steps: int = 3,
                 tool_timeout: float = 120.0, retrieve_k: int = 3, history_turns: int = 4,
                 retrieve_min_score: float = 0.3, guard: bool = True, database=None):
        self.thinker = thinker
        self.store = store
        self.tools_for = tools_for  # session id -> that session's allowed LangChain tools
        self.knowledge_base = knowledge_base
        self.knowledge_base_for = knowledge_base_for  # session id -> its tenant's store; else `knowledge_base`
        self.generate = generate  # (modality, conditioning) -> (bytes, suffix, meta)
        self.max_steps = max_steps
        self.tool_timeout = tool_timeout
        self.retrieve_k = retrieve_k
        self.history_turns = history_turns
        self.retrieve_min_score = retrieve_min_score  # weaker passages distract more than they help
        self.guard = guard  # False only to measure what the injection defences stop (the injection bench)
        self.database = database  # tools.database.Database: sessions shared by every process on it
        self._conn = None
        if database is not None:
            self.saver = database.checkpointer("sessions")
        else:
            from langgraph.checkpoint.sqlite import SqliteSaver

            data_dir.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(data_dir / "sessions.sqlite", check_same_thread=False)
            # WAL + NORMAL: a commit per turn without an fsync per write; still safe against process crashes
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self.saver = SqliteSaver(self._conn)
            self.saver.setup()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tool")
        self.graph = self._build().compile(checkpointer=self.saver)

    # --- nodes ------------------------------------------------------------------------------

    def _ingest(self, state: TurnState, config) -> dict:
        session = config["configurable"]["thread_id"]
        media, notes = [], []
        for item in state.get("attachments", []):
            try:
                if "media_id" in item:  # stored already (the CLI validates the user's own files first)
                    record = self.store.get(session, item["media_id"])
                else:
                    record = self.store.add_file(session, item["path"], item.get("kind"))
            except SignalgraphError as exc:
                notes.append(f"{item.get('path', item.get('media_id'))}: {exc}")
                continue
            media.append(record.id)
        human = state["messages"][-1]
        # the tools this turn may use, from the user's words alone, before anything is read
        intended = tool_policy.intended_tools(human.text, self._session_tools(session, state))
        update: dict = {"media": media, "intended": intended,
                        "trace": [_entry("ingest", media=media, rejected=notes, intended=intended)]}
        if media:
            content = f"{human.text}\n[attached: {', '.join(media)}]"
            update["messages"] = [HumanMessage(content=content, id=human.id)]
        if notes:
            update["trace"].append(_entry("reject", reason="; ".join(notes)))
            update["notices"] = [f"not attached: {note}" for note in notes]
        return update

    def _retrieve(self, state: TurnState, config) -> dict:
        session = config["configurable"]["thread_id"]
        knowledge_base = self.knowledge_base_for(session) if self.knowledge_base_for else self.knowledge_base
        if knowledge_base is None or self.retrieve_k == 0:
            return {"passages": [], "trace": [_entry("retrieve", skipped="no knowledge base")]}
        if getattr(knowledge_base, "count", lambda: 1)() == 0:
            return {"passages": [], "trace": [_entry("retrieve", skipped="the knowledge base is empty")]}
        query = state["messages"][-1].text
        hits = knowledge_base.similarity_search_with_score(query, k=self.retrieve_k)
        passages = [{"text": doc.page_content, "source": Path(str(doc.metadata.get("source", "?"))).name,
                     "position": doc.metadata.get("position", 0), "score": round(float(score), 3)}
                    for doc, score in hits if score >= self.retrieve_min_score]
        return {"passages": passages,
                "trace": [_entry("retrieve", hits=[f"{p['source']}#{p['position']}" for p in passages])]}

    def _session_tools(self, session: str, state: TurnState) -> list:
        tools = self.tools_for(session)
        if state.get("turn_tools") is not None:
            tools = [t for t in tools if t.name in state["turn_tools"]]
        return tools

    def _think(self, state: TurnState, config) -> dict:
        session = config["configurable"]["thread_id"]
        tools = self._session_tools(session, state)
        media = [{"id": m, "kind": (r := self.store.get(session, m)).kind, "path": str(r.path)}
                 for m in state.get("media", [])]
        writer = get_stream_writer()
        stream = PlainLinkStream(lambda text: writer({"text": text})) if self.guard \
            else (lambda text: writer({"text": text}))
        passages = state.get("passages", [])
        if self.guard:
            passages = [{**p, "text": neutralise(redact(p["text"], note=""))} for p in passages]
        result = self.thinker.think(self._window(state["messages"]), tools=tool_schemas(tools),
                                    passages=passages,
                                    media=media, on_text=ProseGate(stream),
                                    require_tool=bool(state.get("require_tool")) and state.get("steps", 0) == 0,
                                    max_new_tokens=state.get("max_new_tokens"))
        if self.guard:
            stream.flush()
        step = state.get("steps", 0) + 1
        text = result.text
        if result.malformed and not result.tool_calls:
            text = (text + "\n" if text else "") + "(I tried to call a tool but wrote the call wrongly: " \
                + "; ".join(result.malformed) + ")"
        calls, seen = [], self._calls_this_turn(state["messages"])
        for c in result.tool_calls:  # small models repeat a call word for word; run it once a turn
            signature = (c["name"], _json(c["args"]))
            if signature not in seen:
                seen.add(signature)
                calls.append(c)
        result.tool_calls = calls
        pending = [dict(c, index=i, step=step) for i, c in enumerate(calls)]
        message = AIMessage(content=text, tool_calls=[{"id": c["id"], "name": c["name"], "args": c["args"]}
                                                      for c in calls])
        trace = [_entry("think", round=step, wrote=result.raw[:500],
                        tool_calls=[c["name"] for c in result.tool_calls],
                        spans=[s["modality"] for s in result.spans], malformed=result.malformed)]
        return {"messages": [message], "pending": pending, "spans": result.spans, "steps": step, "trace": trace,
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
                "truncated": result.truncated and not calls}

    @staticmethod
    def _calls_this_turn(messages: list) -> set:
        return {(c["name"], _json(c["args"])) for m in _this_turn(messages) if isinstance(m, AIMessage)
                for c in m.tool_calls}

    def _window(self, messages: list) -> list:
        """The last `history_turns` user turns and everything after them: what the backbone sees."""
        starts = [i for i, m in enumerate(messages) if isinstance(m, HumanMessage)]
        return messages[starts[-self.history_turns]:] if len(starts) > self.history_turns else messages

    def _route(self, state: TurnState):
        if state.get("pending") and state["steps"] <= self.max_steps:
            return "gate"
        if state.get("spans"):
            return "generate"
        return "respond"

    def _gate(self, state: TurnState, config) -> dict:
        """The tool policy: each call the model wrote runs, is refused with its reason, or (a tool
        that needs confirmation) waits for the user's yes or no."""
        if not self.guard:
            return {"trace": [_entry("gate", allowed=[c["name"] for c in state["pending"]], guard="off")]}
        session = config["configurable"]["thread_id"]
        tools = {t.name: t for t in self.tools_for(session)}
        request = _request(state["messages"])
        untrusted = [(f"{p['source']}#{p['position']}", p["text"]) for p in state.get("passages", [])]
        untrusted += [(f"the {r['name']} result", " ".join([r["summary"], *tool_policy.text_values(r["artifact"])]))
                      for r in state.get("results", []) if not r["error"]]
        allowed, refused, confirm, trace = [], [], [], []
        for call in state["pending"]:
            verdict = tool_policy.check(call, tools.get(call["name"]), request=request,
                                        intended=state.get("intended") or [], untrusted=untrusted)
            if not verdict.allowed:
                refused.append((call, verdict.reason))
            elif verdict.confirm:
                confirm.append(call)
            else:
                allowed.append(call)
        if confirm:
            question = " ".join(_question(c) for c in confirm) + " Say yes to go ahead or no to cancel."
            answer = interrupt({"actions": [{"tool": c["name"], "args": c["args"]} for c in confirm],
                               "question": question})
            approved = isinstance(answer, dict) and answer.get("approve") is True
            trace.append(_entry("confirm", tools=[c["name"] for c in confirm], approved=approved))
            if approved:
                allowed += confirm
            else:
                refused += [(c, "you did not approve it") for c in confirm]
        results = []
        for call, reason in refused:
            trace.append(_entry("refuse", tool=call["name"], args=call["args"], reason=reason))
            results.append({"index": call["index"], "step": call["step"], "id": call["id"], "name": call["name"],
                            "summary": f"{call['name']} was not run: {reason}.", "artifact": None,
                            "error": reason, "created": [], "refused": True})
        trace.append(_entry("gate", allowed=[c["name"] for c in allowed], refused=[c["name"] for c, _ in refused]))
        return {"pending": allowed, "results": results, "trace": trace}

    def _after_gate(self, state: TurnState):
        if state.get("pending"):
            return [Send("act", {"call": call}) for call in state["pending"]]
        return "collect"

    def _act(self, payload: dict, config) -> dict:
        call = payload["call"]
        session = config["configurable"]["thread_id"]
        started = time.perf_counter()
        tools = {t.name: t for t in self.tools_for(session)}
        tool = tools.get(call["name"])
        outcome = None
        if tool is None:
            error = f"there is no tool called {call['name']!r}; available: {', '.join(sorted(tools)) or 'none'}"
        else:
            before = self._generated(session)
            future = self._pool.submit(call_tool, tool, call["args"], call["id"])
            try:
                outcome = future.result(timeout=self.tool_timeout)
                error = outcome.error
            except FutureTimeout:
                error = f"it did not finish within {self.tool_timeout:g} s"
            except SignalgraphError as exc:
                error = str(exc)
            except Exception as exc:  # a tool's own bug: report it to the model and the user, keep the session
                error = f"{type(exc).__name__}: {exc}"
        # what the tool made: generated records that appeared while it ran (parallel tools may
        # each see the others' too; collect de-duplicates)
        created = [m for m in self._generated(session) if m not in before] if tool is not None else []
        summary = outcome.text if outcome is not None and not error else f"{call['name']} failed: {error}"
        result = {"index": call["index"], "step": call["step"], "id": call["id"], "name": call["name"],
                  "summary": summary, "artifact": outcome.artifact if outcome is not None else None,
                  "error": error, "created": created}
        entry = _entry("act", tool=call["name"], args=call["args"], seconds=round(time.perf_counter() - started, 3),
                       error=error, result=result["artifact"])  # the raw result stays in the trace
        return {"results": [result], "trace": [entry]}

    def _collect(self, state: TurnState) -> dict:
        step = state["steps"]
        results = sorted((r for r in state.get("results", []) if r["step"] == step), key=lambda r: r["index"])
        messages = [ToolMessage(content=neutralise(redact(r["summary"], note="")) if self.guard else r["summary"],
                                artifact=r["artifact"], tool_call_id=r["id"], name=r["name"],
                                status="error" if r["error"] else "success") for r in results]
        outputs = list(dict.fromkeys(m for r in results for m in r["created"]))
        return {"messages": messages, "pending": [], "outputs": outputs,
                "trace": [_entry("collect", results=[r["name"] for r in results])]}

    def _generated(self, session: str) -> list[str]:
        return [r.id for r in self.store.list(session) if r.origin == "generated"]

    def _after_collect(self, state: TurnState) -> str:
        return "think" if state["steps"] < self.max_steps else "respond"

    def _generate(self, state: TurnState, config) -> dict:
        session = config["configurable"]["thread_id"]
        outputs, trace, notes = [], [], []
        for span in state.get("spans", []):
            cache = getattr(self.thinker, "cache", None)
            conditioning = cache.get(span["key"]) if cache is not None and span.get("key") else None
            if self.generate is None or conditioning is None:
                reason = span.get("error") or ("no generator is configured" if self.generate is None
                                               else "its conditioning was lost when the process restarted")
                notes.append(f"I could not make the {span['modality']}: {reason}.")
                trace.append(_entry("generate", modality=span["modality"], error=reason))
                continue
            try:
                data, suffix, meta = self.generate(span["modality"], conditioning)
            except SignalgraphError as exc:
                notes.append(f"I could not make the {span['modality']}: {exc}")
                trace.append(_entry("generate", modality=span["modality"], error=str(exc)))
                continue
            record = self.store.add_generated(session, span["modality"], data, suffix, meta)
            outputs.append(record.id)
            trace.append(_entry("generate", modality=span["modality"], media=record.id, via="output projector"))
        update: dict = {"outputs": outputs, "spans": [], "trace": trace}
        if notes:
            update["messages"] = [AIMessage(content=" ".join(notes))]
        return update

    def _respond(self, state: TurnState, config) -> dict:
        """The reply a person reads: the model's words after the last tool result, checked and
        completed from the tools' own sentences (graphs/reply.py)."""
        turn = _this_turn(state["messages"])
        last_result = max((i for i, m in enumerate(turn) if isinstance(m, ToolMessage)), default=-1)
        said = " ".join(m.text for m in turn[last_result + 1:] if isinstance(m, AIMessage) and m.text)
        results = sorted(state.get("results", []), key=lambda r: (r["step"], r["index"]))
        if self.guard:  # a quoted note or transcript shows where an instruction to the agent was cut
            results = [{**r, "summary": redact(r["summary"])} for r in results]
        reply = compose(said, results)
        request = _request(state["messages"])
        if not results and asks_capabilities(request):  # said from what this session has, never invented
            reply = describe(tool_schemas(self._session_tools(config["configurable"]["thread_id"], state)),
                             getattr(self.thinker, "skills", list)())
        if self.guard:
            reply = plain_links(reply).strip()
        if not reply:
            reply = "Here it is." if state.get("outputs") else \
                "I have no answer to that. Could you say it another way?"
        update: dict = {"trace": [_entry("respond", outputs=state.get("outputs", []),
                                         composed=reply != said.strip())]}
        if reply != said.strip():
            update["messages"] = [AIMessage(content=reply)]
        return update

    def _build(self) -> StateGraph:
        graph = StateGraph(TurnState)
        for name, node in [("ingest", self._ingest), ("retrieve", self._retrieve), ("think", self._think),
                           ("gate", self._gate), ("act", self._act), ("collect", self._collect), ("generate",
                                                                                                  self._generate),
                           ("respond", self._respond)]:
            graph.add_node(name, node)
        graph.add_edge(START, "ingest")
        graph.add_edge("ingest", "retrieve")
        graph.add_edge("retrieve", "think")
        graph.add_conditional_edges("think", self._route, ["gate", "generate", "respond"])
        graph.add_conditional_edges("gate", self._after_gate, ["act", "collect"])
        graph.add_edge("act", "collect")
        graph.add_conditional_edges("collect", self._after_collect, ["think", "respond"])
        graph.add_edge("generate", "respond")
        graph.add_edge("respond", END)
        return graph

    # --- turns and sessions -----------------------------------------------------------------

    def turn(self, session: str, text: str, attachments: list[dict] = (),
             on_text: Callable[[str], None] | None = None, *, tools: list[str] | None = None,
             require_tool: bool = False, max_new_tokens: int | None = None) -> TurnResult:
        """Run one turn. `tools` narrows this turn to some of the session's tools; `require_tool`
        makes its first step a tool call (scripted steps that must use a tool); `max_new_tokens`
        bounds each think round (the API's max_tokens). While a tool waits for confirmation, a yes
        or no answers it; any other message drops the action and starts a new turn."""
        with self._session_lock(session):
            return self._turn(session, text, attachments, on_text, tools, require_tool, max_new_tokens)

    def _session_lock(self, session: str):
        """On a shared database, a session's turns run one at a time across all processes."""
        return self.database.lock(f"session:{session}") if self.database is not None else nullcontext()

    def _turn(self, session, text, attachments, on_text, tools, require_tool, max_new_tokens) -> TurnResult:
        if self.pending(session) is not None:
            answer = _yes_or_no(text)
            if answer is not None:  # the message answers the question the last turn asked
                return self.resume(session, approve=answer, on_text=on_text)
            self.resume(session, approve=False)  # a new request instead of an answer: the action is dropped
        start = {"messages": [HumanMessage(content=text)], "attachments": list(attachments), "media": [],
                 "passages": [], "pending": [], "spans": [], "results": None, "outputs": None, "usage": None,
                 "truncated": False, "steps": 0, "turn_tools": tools, "require_tool": require_tool, "notices": [],
                 "max_new_tokens": max_new_tokens, "intended": []}
        return self._run(session, start, on_text)

    def resume(self, session: str, *, approve: bool, on_text: Callable[[str], None] | None = None) -> TurnResult:
        """Finish a turn that waits for the user's confirmation: run the tool (approve) or not."""
        with self._session_lock(session):
            if self.pending(session) is None:
                raise SignalgraphError(f"session {session!r} has no action waiting for confirmation")
            return self._run(session, Command(resume={"approve": approve}), on_text)

    def pending(self, session: str) -> dict | None:
        """The action a session's last turn paused on, waiting for a yes or no; None if none."""
        snapshot = self.graph.get_state({"configurable": {"thread_id": session}})
        return snapshot.interrupts[0].value if snapshot.interrupts else None

    def _run(self, session: str, start, on_text) -> TurnResult:
        config = {"configurable": {"thread_id": session}}
        # One checkpoint per finished (or paused) turn ("exit"): a session resumes from its last
        # completed turn, and a turn does not pay for a database write at every step.
        if on_text is None:
            self.graph.invoke(start, config, durability="exit")
        else:
            for chunk in self.graph.stream(start, config, stream_mode="custom", durability="exit"):
                on_text(chunk["text"])
        final = self.state(session)
        waiting = self.pending(session)
        reply = next((m for m in reversed(_this_turn(final["messages"])) if isinstance(m, AIMessage) and m.text),
                     None)
        text = waiting["question"] if waiting else (reply.text if reply else "")
        media = [{"id": mid, "kind": (r := self.store.get(session, mid)).kind, "path": str(r.path)}
                 for mid in final.get("outputs", [])]
        trace = final.get("trace", [])
        first = max(i for i, e in enumerate(trace) if e["step"] == "ingest")  # every turn starts with ingest
        citations = [f"{p['source']}#{p['position']}" for p in final.get("passages", [])]
        usage = {"prompt_tokens": 0, "completion_tokens": 0, **final.get("usage", {})}
        return TurnResult(session, text, media, trace[first:], citations, final.get("notices", []), usage,
                          "length" if final.get("truncated") else "stop", waiting)

    def state(self, session: str) -> dict:
        return self.graph.get_state({"configurable": {"thread_id": session}}).values

    def sessions(self) -> list[str]:
        if self.database is not None:
            return self.database.threads("sessions")
        rows = self._conn.execute("SELECT DISTINCT thread_id FROM checkpoints ORDER BY thread_id").fetchall()
        return [r[0] for r in rows]

    def delete_session(self, session: str) -> None:
        self.saver.delete_thread(session)
        self.store.delete_session(session)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._conn is not None:  # the database, shared, is closed by its owner
            self._conn.close()


def _this_turn(messages: list) -> list:
    """The messages after the last user message."""
    last_human = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=-1)
    return messages[last_human + 1:]


def _request(messages: list) -> str:
    """The user's words this turn (what the tool policy and the capability answer go by)."""
    return next(m for m in reversed(messages) if isinstance(m, HumanMessage)).text


def _question(call: dict) -> str:
    args = ", ".join(f"{k}: {v}" for k, v in call["args"].items())
    return f"Shall I run {call['name'].replace('_', ' ')}" + (f" ({args})?" if args else "?")


_YES = re.compile(r"^\s*(yes|y|yeah|yep|sure|ok|okay|approve[d]?|confirm(ed)?|go ahead|do it|please do)\b", re.I)
_NO = re.compile(r"^\s*(no|n|nope|cancel|reject(ed)?|stop|don'?t|do not|decline)\b", re.I)


def _yes_or_no(text: str) -> bool | None:
    return True if _YES.search(text) else False if _NO.search(text) else None


def _json(value) -> str:
    import json

    return json.dumps(value, default=str)

