"""A tool of your own, registered in the config, that acts on the world: it "sends" mail by
writing it to an outbox folder ($SIGNALGRAPH_OUTBOX, default ./outbox), one JSON file a mail.

    # signalgraph.yaml
    extra_tools: ["mail_tool:send_mail"]      # with PYTHONPATH=examples

It declares itself high-risk (`confirm`), so every call waits for the user's yes; and it runs only
when the user's own request asks to send or mail something (`intent`), never because a note or a
transcript said so.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from langchain_core.tools import StructuredTool
from pydantic import BaseModel, Field


class MailArgs(BaseModel):
    to: str = Field(description="the recipient's address", pattern=r"^[^@\s]+@[^@\s]+$")
    text: str = Field(description="what the mail says", min_length=1)


def _send_mail(to: str, text: str) -> dict:
    outbox = Path(os.environ.get("SIGNALGRAPH_OUTBOX", "outbox"))
    outbox.mkdir(parents=True, exist_ok=True)
    path = outbox / f"mail-{time.time_ns()}.json"
    path.write_text(json.dumps({"to": to, "text": text}))
    return {"sent_to": to, "file": str(path)}


send_mail = StructuredTool.from_function(
    _send_mail, name="send_mail", description="Send an email.", args_schema=MailArgs,
    metadata={"effect": "acts", "intent": r"\b(send|mail|email|e-mail)\b", "confirm": True},
)
