"""Skills for a BabyAI episode, as LangChain tools a planner calls: go to, pick up, drop, open a
door, put next to.

Each skill drives minigrid's low-level actions with the path planner over the map of cells seen
so far (tools/babyai_world.py), checks its postcondition, and on failure raises a ToolException
whose message says what went wrong (the tool returns it as its result), so the planner can plan
again. Skills are built afresh before each plan: their arguments are enums of the phrases that
name objects actually seen, so a constrained decoder can only name a real object.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from langchain_core.tools import StructuredTool, ToolException
from minigrid.core.actions import Actions
from pydantic import ConfigDict, Field, create_model

from models.errors import ConfigError
from tools.babyai_world import (
    CARRIABLE,
    LOCATION_WORDS,
    OBJECT_TYPES,
    GridMap,
    Pose,
    Thing,
    descriptions,
    path_still_clear,
    phrases,
    plan_path,
)

_OPEN, _LOCKED = 0, 2  # minigrid's door states


class UnknownEnvironmentError(ConfigError):
    """A name that is not one of minigrid's registered BabyAI levels."""


def make_env(name: str):
    """A headless BabyAI environment that renders RGB frames on request."""
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers the BabyAI levels with gymnasium)

    levels = sorted(k for k in gym.registry if k.startswith("BabyAI-"))
    if name not in levels:
        raise UnknownEnvironmentError(
            f"unknown BabyAI level {name!r}; try BabyAI-GoToObj-v0, BabyAI-GoToLocal-v0, BabyAI-PickupLoc-v0, "
            f"BabyAI-OpenDoor-v0 or BabyAI-PutNextLocal-v0 ({len(levels)} levels in all)")
    return gym.make(name, render_mode="rgb_array")


class EpisodeOver(Exception):
    """The mission ended (done or out of time) while a skill was still acting."""


class Episode:
    """One BabyAI episode as the skills see it: the environment, the map of what the agent has
    seen, and the pose it had when the mission was given (BabyAI's 'on your left' refers to it)."""

    def __init__(self, env, seed: int, on_step: Callable[[Episode], None] | None = None):
        self.env = env
        self.world = env.unwrapped
        with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints every level sample it rejects
            obs, _ = env.reset(seed=seed)
        self.mission: str = obs["mission"]
        self.map = GridMap(self.world.width, self.world.height)
        self.start = self.pose
        self.steps = 0
        self.reward = 0.0
        self.terminated = self.truncated = False
        self.path_replans = 0  # paths given up because the map showed them blocked
        self.on_step = on_step
        self.map.observe(obs["image"], self.pose)

    @property
    def pose(self) -> Pose:
        return Pose(int(self.world.agent_pos[0]), int(self.world.agent_pos[1]), int(self.world.agent_dir))

    @property
    def carrying(self) -> Thing | None:
        held = self.world.carrying
        return Thing(held.type, held.color, self.pose.pos) if held is not None else None

    @property
    def over(self) -> bool:
        return self.terminated or self.truncated

    @property
    def success(self) -> bool:
        return self.terminated and self.reward > 0

    def act(self, action: int) -> None:
        """One low-level action. Raises EpisodeOver once the episode has ended, at the next action:
        the action that ends it still lets its skill check its postcondition."""
        if self.over:
            raise EpisodeOver
        obs, reward, self.terminated, self.truncated, _ = self.env.step(int(action))
        self.reward += float(reward)
        self.steps += 1
        self.map.observe(obs["image"], self.pose)
        if self.on_step is not None:
            self.on_step(self)

    # --- perception -----------------------------------------------------------------------------

    def look_around(self) -> None:
        """Turn on the spot until every direction has been in view."""
        for _ in range(3):
            self.act(Actions.left)

    def explore(self) -> bool:
        """Walk toward the nearest cell never seen until a new object comes into view.
        False when no unseen cell can be reached (everything reachable has been seen)."""
        before = set(self.map.things())
        while not set(self.map.things()) - before:
            moves = plan_path(self.map, self.pose, lambda p: self.map.unseen(p.front))
            if moves is None:
                return False
            if moves:
                self.act(moves[0])
            else:  # already facing an unseen cell that stays unseen (out of the grid): nothing to learn
                return False
        return True

    # --- moving ---------------------------------------------------------------------------------

    def matching(self, phrase: str, types=None) -> list[Thing]:
        return [t for t in self.map.things(types or OBJECT_TYPES)
                if phrase in descriptions(t, self.start)]

    def walk_to_face(self, targets: Callable[[], set[tuple[int, int]]], what: str) -> None:
        """Walk until facing one of `targets()` (asked again after every step: the map changes),
        re-planning the path whenever the map shows it blocked."""
        moves: list[int] | None = None
        while True:
            goal_cells = targets()
            if not goal_cells:
                raise ToolException(f"cannot find {what} on the map")

            def facing(pose: Pose) -> bool:
                return pose.front in goal_cells

            if facing(self.pose):
                return
            if moves is None or not path_still_clear(self.map, self.pose, moves, facing):
                if moves is not None:
                    self.path_replans += 1
                moves = plan_path(self.map, self.pose, facing)
                if moves is None:
                    raise ToolException(f"no path to {what} through the cells seen so far")
            self.act(moves.pop(0))

    def _front_thing(self) -> Thing | None:
        cell = self.map.get(self.pose.front)
        return Thing(cell.type, cell.color, self.pose.front) if cell and cell.type in CARRIABLE + ("door",) else None

    # --- skills ---------------------------------------------------------------------------------

    def go_to(self, object: str) -> dict:
        self.walk_to_face(lambda: {t.pos for t in self.matching(object)}, object)
        thing = self._front_thing()
        if thing is None or object not in descriptions(thing, self.start):
            raise ToolException(f"walked to {object} but it is not in front")
        return {"did": f"facing the {thing.name}"}

    def pick_up(self, object: str) -> dict:
        held = self.carrying
        if held is not None and object in descriptions(held, None):
            return {"did": f"already carrying the {held.name}"}
        if held is not None:
            self.drop()  # one hand: put down what is carried first
        self.walk_to_face(lambda: {t.pos for t in self.matching(object, CARRIABLE)}, object)
        expected = self._front_thing()
        self.act(Actions.pickup)
        held = self.carrying
        if held is None or expected is None or held.name != expected.name:
            raise ToolException(f"tried to pick up {object} but carry {held.name if held else 'nothing'}")
        return {"did": f"carrying the {held.name}"}

    def drop(self) -> dict:
        held = self.carrying
        if held is None:
            raise ToolException("carrying nothing, so nothing to drop")
        self.walk_to_face(lambda: {p for p in self.map.cells if self.map.empty(p)}, "a free cell")
        self.act(Actions.drop)
        if self.carrying is not None:
            raise ToolException(f"could not put down the {held.name}")
        return {"did": f"put down the {held.name}"}

    def open_door(self, door: str) -> dict:
        self.walk_to_face(lambda: {t.pos for t in self.matching(door, ("door",))}, door)
        front = self.pose.front
        cell = self.map.get(front)
        if cell.state == _OPEN:
            return {"did": f"the {cell.color} door is already open"}
        held = self.carrying
        if cell.state == _LOCKED and not (held and held.type == "key" and held.color == cell.color):
            raise ToolException(f"the {cell.color} door is locked; it opens with the {cell.color} key")
        self.act(Actions.toggle)
        if self.map.get(front).state != _OPEN:
            raise ToolException(f"the {cell.color} door did not open")
        return {"did": f"opened the {cell.color} door"}

    def put_next_to(self, object: str, next_to: str) -> dict:
        held = self.carrying
        if held is None or object not in descriptions(held, None):
            self.pick_up(object)
        held = self.carrying

        def beside() -> set[tuple[int, int]]:
            cells = set()
            for thing in self.matching(next_to):
                x, y = thing.pos
                cells |= {p for p in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)) if self.map.empty(p)}
            return cells

        self.walk_to_face(beside, f"a free cell next to {next_to}")
        spot = self.pose.front
        self.act(Actions.drop)
        placed = self.map.get(spot)
        near = {t.pos for t in self.matching(next_to)}
        x, y = spot
        if not placed or placed.type != held.type or not near & {(x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)}:
            raise ToolException(f"the {held.name} did not end up next to {next_to}")
        return {"did": f"put the {held.name} next to {next_to}"}


# --- skills as tools ----------------------------------------------------------------------------

def _choice(values: list[str], description: str) -> tuple[Any, Any]:
    # an enum even for one value (pydantic writes a one-value Literal as `const`)
    return Literal[tuple(values)], Field(description=description, json_schema_extra={"enum": values})


def _skill(episode: Episode, name: str, description: str, func: Callable[..., dict], *,
           any_of: list[dict] | None = None, **fields) -> StructuredTool:
    # any_of: whole argument schemas, one of which must hold (the decoder follows them; the
    # top-level properties stay for the signature the planner reads)
    extra = (lambda schema: schema.update(anyOf=any_of)) if any_of else None
    args = create_model(f"{name}_args", __config__=ConfigDict(extra="forbid", json_schema_extra=extra), **fields)

    def run(**kwargs) -> dict:
        start = episode.steps
        try:
            result = func(**kwargs)
        except EpisodeOver:
            result = {"did": "the episode ended"}
        return {**result, "steps": episode.steps - start}

    return StructuredTool.from_function(
        func=run, name=name, description=description, args_schema=args, handle_tool_error=True,
        handle_validation_error=lambda error: f"the arguments of {name} do not name objects seen so far")


def _bare(phrase: str) -> str:
    """The colour and type of a phrase, without article or location: 'the red ball on your left' -> 'red ball'."""
    name = phrase.split(" ", 1)[1]
    for words in LOCATION_WORDS.values():
        name = name.removesuffix(f" {words}")
    return name


def _pairs(objects: list[str], targets: list[str], tried: dict[str, set[str]]) -> list[dict]:
    """put_next_to's arguments as cases, so that no object is put again next to a target it was
    already put next to: objects that may go next to the same targets share a case."""
    cases: dict[tuple[str, ...], list[str]] = {}
    for obj in objects:
        allowed = tuple(t for t in targets if _bare(t) not in tried.get(_bare(obj), ()))
        if allowed:
            cases.setdefault(allowed, []).append(obj)
    return [{"type": "object", "additionalProperties": False, "required": ["object", "next_to"],
             "properties": {"object": {"type": "string", "enum": objs},
                            "next_to": {"type": "string", "enum": list(to)}}}
            for to, objs in cases.items()]


def build_skills(episode: Episode, spent: Iterable[Sequence[str]] = ()) -> list[StructuredTool]:
    """The skills that make sense now, their first argument limited to the objects seen so far.

    `spent` holds skill calls carried out without finishing the mission, as (skill, *arguments).
    For one object, that object was the wrong choice for that skill, so it is not offered again,
    however it is named. For put_next_to the pair was wrong, and either one may be right with
    another: the pair is not offered again, and the object moved last is not offered as the one to
    move (most often the two were swapped) until another object has been moved in vain.
    """
    wrong: dict[str, set[str]] = {}
    tried: dict[str, set[str]] = {}  # put_next_to: object -> targets it was put next to
    moved = ""
    for skill, phrase, *rest in spent:
        if skill == "put_next_to" and rest:
            tried.setdefault(_bare(phrase), set()).add(_bare(rest[0]))
            moved = _bare(phrase)
        else:
            wrong.setdefault(skill, set()).add(_bare(phrase))
    if moved:
        wrong.setdefault("put_next_to", set()).add(moved)

    def offer(skill: str, values: Iterable[str]) -> list[str]:
        return sorted(v for v in set(values) if _bare(v) not in wrong.get(skill, ()))

    things = episode.map.things()
    held = episode.carrying
    movable = [t for t in things if t.type in CARRIABLE]
    everything = phrases(things, episode.start)
    what = "the object, in the mission's words"
    skills = []
    if values := offer("go_to", everything):
        skills.append(_skill(episode, "go_to", "Walk to an object and face it.", episode.go_to,
                             object=_choice(values, what)))
    if values := offer("pick_up", phrases(movable, episode.start)):
        skills.append(_skill(episode, "pick_up", "Pick up an object.", episode.pick_up,
                             object=_choice(values, what)))
    if held is not None:
        skills.append(_skill(episode, "drop", "Put down what you carry.", episode.drop))
    if values := offer("open", phrases([t for t in things if t.type == "door"], episode.start)):
        skills.append(_skill(episode, "open", "Open a door.", episode.open_door,
                             door=_choice(values, "the door, in the mission's words")))
    to_carry = offer("put_next_to", phrases(movable, episode.start) + (descriptions(held, None) if held else []))
    cases = _pairs(to_carry, everything, tried) if tried else None
    if to_carry and len(things) + (held is not None) >= 2 and cases != []:
        skills.append(_skill(episode, "put_next_to", "Put an object next to another object.", episode.put_next_to,
                             any_of=cases, object=_choice(to_carry, what),
                             next_to=_choice(everything, "the object to put it next to")))
    return skills
