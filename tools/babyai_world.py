"""What an embodied agent knows of a BabyAI grid: the cells it has seen, how to move through them,
the words that name what it has seen, and the short text its planner reads.

The map holds only what the agent's egocentric 7x7 view showed, cell by cell, last sighting wins,
so an object that moved or was picked up disappears from the map once its cell is seen again.
The path planner is a breadth-first search over poses (cell and heading) with minigrid's own moves
(turn left, turn right, forward); cells never seen count as passable, so a plan may lead through
the unknown and is checked again whenever the view changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from minigrid.core.actions import Actions
from minigrid.core.constants import DIR_TO_VEC, IDX_TO_COLOR, IDX_TO_OBJECT

OBJECT_TYPES = ("ball", "box", "key", "door")  # what skills can name
CARRIABLE = ("ball", "box", "key")
# BabyAI's location words, relative to where the agent stood and faced when the mission was given
LOCATION_WORDS = {"front": "in front of you", "behind": "behind you", "left": "on your left", "right": "on your right"}
_PASSABLE = {"empty", "floor", "goal"}
_OPEN = 0  # door states in minigrid's encoding: 0 open, 1 closed, 2 locked


@dataclass(frozen=True)
class Pose:
    x: int
    y: int
    dir: int  # minigrid's: 0 east, 1 south, 2 west, 3 north

    @property
    def pos(self) -> tuple[int, int]:
        return (self.x, self.y)

    @property
    def front(self) -> tuple[int, int]:
        dx, dy = DIR_TO_VEC[self.dir]
        return (self.x + int(dx), self.y + int(dy))

    def after(self, action: int) -> Pose:
        """Where a move would take the agent if the cell ahead is free."""
        if action == Actions.left:
            return Pose(self.x, self.y, (self.dir - 1) % 4)
        if action == Actions.right:
            return Pose(self.x, self.y, (self.dir + 1) % 4)
        if action == Actions.forward:
            return Pose(*self.front, self.dir)
        return self

    def relative(self, pos: tuple[int, int]) -> tuple[int, int]:
        """(steps ahead, steps to the right) of a cell from this pose; negative is behind / left."""
        fx, fy = (int(v) for v in DIR_TO_VEC[self.dir])
        vx, vy = pos[0] - self.x, pos[1] - self.y
        return vx * fx + vy * fy, vx * -fy + vy * fx


@dataclass(frozen=True)
class Cell:
    type: str
    color: str = ""
    state: int = 0  # doors: 0 open, 1 closed, 2 locked


@dataclass(frozen=True)
class Thing:
    """An object the agent has seen, where it saw it last."""

    type: str
    color: str
    pos: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.color} {self.type}"


class GridMap:
    """The cells seen so far."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.cells: dict[tuple[int, int], Cell] = {}

    def observe(self, image: np.ndarray, pose: Pose) -> list[tuple[int, int]]:
        """Add one egocentric view (minigrid's `obs["image"]`, agent at the bottom middle facing
        up); return the cells whose content differs from what was seen there before."""
        size = image.shape[0]
        changed = []
        for i in range(size):
            for j in range(size):
                kind = IDX_TO_OBJECT[int(image[i, j, 0])]
                if kind == "unseen":
                    continue
                ahead, right = size - 1 - j, i - size // 2
                if ahead == 0 and right == 0:
                    kind = "empty"  # the agent's own cell shows what it carries, not the floor
                pos = self._world(pose, ahead, right)
                if not (0 <= pos[0] < self.width and 0 <= pos[1] < self.height):
                    continue
                cell = Cell(kind, IDX_TO_COLOR[int(image[i, j, 1])] if kind in OBJECT_TYPES else "",
                            int(image[i, j, 2]) if kind == "door" else 0)
                before = self.cells.get(pos)
                if before is not None and before != cell:
                    changed.append(pos)
                self.cells[pos] = cell
        return changed

    @staticmethod
    def _world(pose: Pose, ahead: int, right: int) -> tuple[int, int]:
        fx, fy = (int(v) for v in DIR_TO_VEC[pose.dir])
        return pose.x + ahead * fx - right * fy, pose.y + ahead * fy + right * fx

    def get(self, pos: tuple[int, int]) -> Cell | None:
        return self.cells.get(pos)

    def inside(self, pos: tuple[int, int]) -> bool:
        return 0 <= pos[0] < self.width and 0 <= pos[1] < self.height

    def passable(self, pos: tuple[int, int]) -> bool:
        """Free as far as the agent knows: seen empty or an open door, or never seen."""
        if not self.inside(pos):
            return False
        cell = self.cells.get(pos)
        return cell is None or cell.type in _PASSABLE or (cell.type == "door" and cell.state == _OPEN)

    def empty(self, pos: tuple[int, int]) -> bool:
        """Seen, and nothing on it (a place to drop something)."""
        cell = self.cells.get(pos)
        return cell is not None and cell.type in _PASSABLE

    def things(self, types: Iterable[str] = OBJECT_TYPES) -> list[Thing]:
        wanted = set(types)
        return [Thing(c.type, c.color, pos) for pos, c in sorted(self.cells.items()) if c.type in wanted]

    def unseen(self, pos: tuple[int, int]) -> bool:
        return self.inside(pos) and pos not in self.cells


# --- naming things as BabyAI's missions do ------------------------------------------------------

def locations(pos: tuple[int, int], start: Pose) -> list[str]:
    """BabyAI's location words that hold for a cell, seen from the mission's starting pose
    (a cell can be both in front and on the left)."""
    ahead, right = start.relative(pos)
    found = []
    if ahead > 0:
        found.append("front")
    if ahead < 0:
        found.append("behind")
    if right < 0:
        found.append("left")
    if right > 0:
        found.append("right")
    return found


def descriptions(thing: Thing, start: Pose | None) -> list[str]:
    """Every phrase that names this thing as a mission would: 'the red ball', 'a ball',
    'the ball on your left', ... Without a starting pose (a thing being carried), no location.

    The article stays in: after the opening quote of a JSON string the model must write 'the' or
    'a' (a token it cannot copy from the mission), and from there on the mission's own tokens
    (' red', ' ball', ' on', ...) are the ones to copy, which small models do well."""
    bases = [thing.name, thing.type]
    where = [LOCATION_WORDS[w] for w in locations(thing.pos, start)] if start else []
    named = bases + [f"{base} {words}" for base in bases for words in where]
    return [f"{article} {name}" for name in named for article in ("the", "a")]


def phrases(things: Iterable[Thing], start: Pose | None) -> list[str]:
    """The phrases that name at least one of these things, sorted, each once."""
    return sorted({p for t in things for p in descriptions(t, start)})


# --- the path planner ---------------------------------------------------------------------------

_MOVES = (Actions.left, Actions.right, Actions.forward)


def plan_path(grid: GridMap, start: Pose, goal: Callable[[Pose], bool], *,
              passable: Callable[[tuple[int, int]], bool] | None = None) -> list[int] | None:
    """The shortest list of moves from `start` to a pose where `goal` holds, or None if there is none.

    Breadth-first over (cell, heading); every move costs one step, so the first pose found is nearest.
    """
    passable = passable or grid.passable
    if goal(start):
        return []
    parents: dict[Pose, tuple[Pose, int]] = {start: (start, -1)}
    queue = deque([start])
    while queue:
        pose = queue.popleft()
        for action in _MOVES:
            nxt = pose.after(action)
            if nxt in parents or (action == Actions.forward and not passable(nxt.pos)):
                continue
            parents[nxt] = (pose, action)
            if goal(nxt):
                moves = []
                while nxt != start:
                    nxt, move = parents[nxt]
                    moves.append(move)
                return moves[::-1]
            queue.append(nxt)
    return None


def path_still_clear(grid: GridMap, pose: Pose, moves: list[int], goal: Callable[[Pose], bool]) -> bool:
    """Whether these moves, walked over the map as it is now, still end where `goal` holds."""
    for action in moves:
        if action == Actions.forward and not grid.passable(pose.front):
            return False
        pose = pose.after(action)
    return goal(pose)


# --- what the planner reads ---------------------------------------------------------------------

def render(grid: GridMap, pose: Pose, carrying: Thing | None) -> str:
    """The things seen so far with where they are from here, and what the agent carries."""
    seen = []
    for thing in grid.things():
        ahead, right = pose.relative(thing.pos)
        where = [f"{abs(ahead)} {'ahead' if ahead > 0 else 'behind'}" if ahead else "",
                 f"{abs(right)} {'right' if right > 0 else 'left'}" if right else ""]
        door = ""
        if thing.type == "door":
            door = {0: "open ", 1: "closed ", 2: "locked "}[grid.get(thing.pos).state]
        seen.append(f"{door}{thing.name} ({', '.join(w for w in where if w)})")
    lines = ["You see: " + ("; ".join(seen) if seen else "nothing yet") + "."]
    lines.append(f"You carry the {carrying.name}." if carrying else "You carry nothing.")
    return "\n".join(lines)
