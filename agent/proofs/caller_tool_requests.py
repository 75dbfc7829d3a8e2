"""Function calling with tools the caller brings (the API's `tools`), as training lines.

An app that talks to the API lists its own tools; the backbone must pick one of them and fill its
arguments from the request, or answer in words when none fits. These invented tools and requests
teach that in the exact prompt the API builds (`graphs/prompting.py::describe_tools`). The
evaluation's tools and requests (agent/proofs/assistant_eval.py: weather, currency, reminders) are
kept out, so what it measures is tools and wordings never trained on.
"""

from __future__ import annotations

import json
import random

from graphs.prompting import describe_tools


def _tool(name: str, description: str, **arguments: str) -> dict:
    return {"name": name, "description": description,
            "parameters": {"type": "object", "properties": {k: {"type": v} for k, v in arguments.items()},
                           "required": list(arguments)}}


# (tool, request wordings with {slots}, slot values); every argument is a slot copied from the request
TOOLS: list[tuple[dict, list[str], dict[str, list]]] = [
    (_tool("search_flights", "Find flights between two cities.", origin="string", destination="string"),
     ["Find me a flight from {origin} to {destination}.", "Are there flights from {origin} to {destination}?",
      "I need to fly {origin} to {destination}, what is there?"],
     {"origin": ["Berlin", "Madrid", "Toronto", "Nairobi"], "destination": ["Rome", "Tokyo", "Boston", "Lisbon"]}),
    (_tool("play_song", "Play a song on the speakers.", title="string"),
     ["Play {title}.", "Put on {title}, please.", "Can you play the song {title}?"],
     {"title": ["Yellow Submarine", "Clair de Lune", "Bohemian Rhapsody", "Take Five"]}),
    (_tool("translate_text", "Translate text into another language.", text="string", language="string"),
     ["Translate '{text}' into {language}.", "How do you say '{text}' in {language}?"],
     {"text": ["good night", "where is the station", "thank you very much"],
      "language": ["French", "German", "Spanish", "Italian"]}),
    (_tool("create_event", "Put an event in the calendar.", title="string", day="string"),
     ["Put {title} in my calendar on {day}.", "Schedule {title} for {day}.", "Add {title} on {day} to the calendar."],
     {"title": ["a team lunch", "the budget review", "a dentist visit"], "day": ["Monday", "Friday", "May 3"]}),
    (_tool("lookup_word", "Look up the meaning of a word in the dictionary.", word="string"),
     ["What does the word {word} mean?", "Look up {word} in the dictionary.", "Define {word}."],
     {"word": ["ephemeral", "laconic", "ubiquitous", "serendipity"]}),
    (_tool("order_food", "Order a dish from the restaurant nearby.", dish="string"),
     ["Order me a {dish}.", "I'd like a {dish} delivered.", "Can you get me a {dish} from the restaurant?"],
     {"dish": ["margherita pizza", "pad thai", "veggie burger", "caesar salad"]}),
    (_tool("stock_price", "Get the latest price of a stock.", symbol="string"),
     ["What is {symbol} trading at?", "Check the stock price of {symbol}.", "How much is one {symbol} share now?"],
     {"symbol": ["AAPL", "MSFT", "NVDA", "TSLA"]}),
    (_tool("send_message", "Send a chat message to a contact.", to="string", text="string"),
     ["Tell {to} that {text}.", "Send {to} a message saying {text}.", "Message {to}: {text}."],
     {"to": ["Maria", "Ken", "Priya"], "text": ["I am running late", "the report is done", "lunch is at one"]}),
    (_tool("set_alarm", "Set an alarm for a time of day.", time="string"),
     ["Wake me up at {time}.", "Set an alarm for {time}.", "I need an alarm at {time}."],
     {"time": ["6:30", "7:15", "5:45", "8:00"]}),
    (_tool("find_recipe", "Find a recipe for a dish.", dish="string"),
     ["How do I make {dish}?", "Find a recipe for {dish}.", "Give me a recipe for {dish}."],
     {"dish": ["lentil soup", "banana bread", "risotto", "guacamole"]}),
    (_tool("track_package", "Track a parcel by its tracking number.", number="string"),
     ["Where is my parcel {number}?", "Track package {number}.", "What's the status of shipment {number}?"],
     {"number": ["ZX4411", "PK2093", "AB7781"]}),
    (_tool("turn_on_light", "Turn on the lights in a room.", room="string"),
     ["Turn on the lights in the {room}.", "Switch the {room} light on.", "It's dark in the {room}, lights please."],
     {"room": ["kitchen", "bedroom", "hallway", "office"]}),
]
# requests no listed tool answers: the reply is words, not a call
NO_TOOL = [("What is the capital of Spain?", "The capital of Spain is Madrid."),
           ("How many days are in a week?", "There are seven days in a week."),
           ("Say hello.", "Hello!"), ("What is 6 times 7?", "6 times 7 is 42."),
           ("Thanks, that's all.", "You're welcome!"), ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
           ("What colour is the sky on a clear day?", "It is blue."),
           ("Tell me a fun fact.", "Octopuses have three hearts.")]

APP_SYSTEMS = ["You are a helpful assistant.", "You are the assistant of a travel app. Be concise.",
               "You help people with everyday tasks.", "Answer politely and briefly."]


def caller_tool_lines(count: int, seed: int = 0, no_tool: float = 0.2) -> list[dict]:
    """`count` conversations: a system prompt listing one to four of the tools as the API does, a
    request, and the call it needs (or, with probability `no_tool`, a plain answer)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        offered = rng.sample(TOOLS, rng.randint(1, 4))
        if rng.random() < no_tool:
            request, answer = rng.choice(NO_TOOL)
        else:
            schema, wordings, slots = rng.choice(offered)
            values = {k: rng.choice(v) for k, v in slots.items()}
            request = rng.choice(wordings).format(**values)
            answer = "<tool_call>" + json.dumps({"name": schema["name"], "arguments": values}) + "</tool_call>"
        system = describe_tools([t for t, _, _ in offered], "auto")
        if rng.random() < 0.3:  # the app's own system message comes first, as the API joins them
            system = rng.choice(APP_SYSTEMS) + "\n\n" + system
        lines.append({"messages": [{"role": "system", "content": system}, {"role": "user", "content": request},
                                   {"role": "assistant", "content": answer}]})
    return lines
