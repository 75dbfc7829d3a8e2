"""Embodied planning in BabyAI: the map, the path planner, the skills, and the observe -> plan ->
act -> check loop, on real minigrid levels with fixed seeds."""

import jsonschema
import pytest
from minigrid.core.world_object import Box

from graphs.embodied import run_episode
from graphs.scripted import ScriptedThinker
from graphs.thinker import ThinkResult
from tools.babyai_skills import Episode, UnknownEnvironmentError, build_skills, make_env
from tools.babyai_world import Cell, GridMap, Pose, descriptions, plan_path, render
from tools.expert_tools import tool_schemas


def _episode(level: str, seed: int) -> Episode:
    return Episode(make_env(level), seed)


def _walk(pose: Pose, moves: list[int]) -> tuple[Pose, list[tuple[int, int]]]:
    cells = []
    for move in moves:
        pose = pose.after(move)
        cells.append(pose.pos)
    return pose, cells


def _call(name: str, **args) -> ThinkResult:
    return ThinkResult("", [{"id": f"call-{name}", "name": name, "args": args}])


# --- the map and the path planner ---------------------------------------------------------------

@pytest.mark.parametrize("level", ["BabyAI-GoToLocal-v0", "BabyAI-OpenDoor-v0"])
def test_map_holds_what_the_agent_saw(level):
    episode = _episode(level, 3)
    episode.look_around()
    for pos, cell in episode.map.cells.items():
        real = episode.world.grid.get(*pos)
        assert cell.type == (real.type if real else "empty"), pos
        if real is not None and real.type in ("ball", "box", "key", "door"):
            assert cell.color == real.color
    assert len(episode.map.cells) < episode.world.width * episode.world.height  # a partial view


def test_planner_finds_the_shortest_way_around_a_wall():
    grid = GridMap(5, 5)
    for x in range(5):
        for y in range(5):
            border = x in (0, 4) or y in (0, 4)
            grid.cells[(x, y)] = Cell("wall" if border or (x == 2 and y < 3) else "empty")
    start = Pose(1, 1, 0)  # facing east, into the wall at (2, 1)
    moves = plan_path(grid, start, lambda p: p.front == (3, 1))
    end, cells = _walk(start, moves)
    assert end.front == (3, 1)
    assert all(grid.passable(c) for c in cells)
    assert len(moves) == 8  # right, forward x2, left, forward x2, left, forward: at (3, 2) facing north
    assert plan_path(grid, start, lambda p: p.pos == (2, 1)) is None  # into the wall: no way


# PutNextLocal ends only when something is dropped: walking about cannot end the episode early
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_path_planner_reaches_the_object(seed):
    episode = _episode("BabyAI-PutNextLocal-v0", seed)
    episode.look_around()
    for target in episode.map.things():
        episode.walk_to_face(lambda: {target.pos}, target.name)
        assert tuple(episode.world.front_pos) == target.pos
        assert episode.world.grid.get(*target.pos).color == target.color
    assert not episode.over


def test_a_blocked_path_is_planned_again():
    episode = _episode("BabyAI-PutNextLocal-v0", 1)
    episode.look_around()
    target = next(t for t in episode.map.things() if t.name == "red key")  # 3 ahead, 2 right: a long way
    moves = plan_path(episode.map, episode.pose, lambda p: p.front == target.pos)
    _, cells = _walk(episode.pose, moves)
    blocked = next(c for c in cells if c != episode.pose.pos)
    episode.world.grid.set(*blocked, Box("grey"))  # appears on the path after the map was made
    episode.walk_to_face(lambda: {target.pos}, "the red key")
    assert episode.path_replans >= 1
    assert tuple(episode.world.front_pos) == target.pos
    assert episode.map.get(blocked) == Cell("box", "grey")


# --- what the planner reads -----------------------------------------------------------------------

def test_text_rendering():
    episode = _episode("BabyAI-GoToObj-v0", 0)
    assert render(episode.map, episode.pose, episode.carrying) == \
        "You see: green key (2 ahead, 1 right).\nYou carry nothing."
    episode.look_around()  # three left turns: the key is now ahead and to the left
    assert render(episode.map, episode.pose, episode.carrying) == \
        "You see: green key (1 ahead, 2 left).\nYou carry nothing."

    doors = _episode("BabyAI-OpenDoor-v0", 0)
    assert render(doors.map, doors.pose, doors.carrying) == "You see: closed red door (1 left).\nYou carry nothing."

    putting = _episode("BabyAI-PutNextLocal-v0", 1)
    build = {s.name: s for s in build_skills(putting)}
    build["pick_up"].invoke({"object": "the green box"})
    assert render(putting.map, putting.pose, putting.carrying).endswith("You carry the green box.")


def test_phrases_follow_the_mission_grammar():
    episode = _episode("BabyAI-OpenDoor-v0", 0)  # mission: open the door in front of you
    door = episode.map.things()[0]
    names = descriptions(door, episode.start)
    assert {"the red door", "a door", "the door on your left"} <= set(names)
    assert "the door in front of you" not in names  # it is on the left of where the agent started


def test_skill_arguments_are_enums_of_seen_objects():
    episode = _episode("BabyAI-GoToObj-v0", 0)
    schemas = {s["name"]: s for s in tool_schemas(build_skills(episode))}
    assert set(schemas) == {"go_to", "pick_up"}  # no door, nothing carried, one object
    objects = schemas["go_to"]["parameters"]["properties"]["object"]["enum"]
    assert "the green key" in objects and "a key" in objects
    assert not any("ball" in o or "box" in o for o in objects)
    with pytest.raises(UnknownEnvironmentError, match="BabyAI-GoToLocal-v0"):
        make_env("BabyAI-NoSuchLevel-v0")


# --- skills and their postconditions --------------------------------------------------------------

def test_skills_achieve_their_postconditions():
    episode = _episode("BabyAI-PutNextLocal-v0", 1)  # put the yellow key next to the purple box
    episode.look_around()
    skills = {s.name: s for s in build_skills(episode)}

    result = skills["pick_up"].invoke({"object": "the green ball"})
    assert result["did"] == "carrying the green ball"
    assert episode.world.carrying.type == "ball" and episode.world.carrying.color == "green"

    skills = {s.name: s for s in build_skills(episode)}
    assert "drop" in skills
    skills["drop"].invoke({})
    assert episode.world.carrying is None
    assert episode.world.grid.get(*episode.world.front_pos).type == "ball"

    skills = {s.name: s for s in build_skills(episode)}
    result = skills["put_next_to"].invoke({"object": "the yellow key", "next_to": "the purple box"})
    assert result["did"] == "put the yellow key next to the purple box"
    assert episode.success  # BabyAI's own verifier agrees


def test_open_reports_a_locked_door_and_opens_an_unlocked_one():
    episode = _episode("BabyAI-OpenDoor-v0", 0)
    red = episode.world.grid.get(9, 14)
    red.is_locked = True
    episode.look_around()
    skills = {s.name: s for s in build_skills(episode)}
    assert skills["open"].invoke({"door": "the red door"}) == \
        "the red door is locked; it opens with the red key"
    assert not red.is_open


    episode = _episode("BabyAI-OpenDoor-v0", 0)  # open the door in front of you
    episode.look_around()
    skills = {s.name: s for s in build_skills(episode)}
    assert skills["open"].invoke({"door": "the red door"})["did"] == "opened the red door"
    assert episode.world.grid.get(9, 14).is_open
    assert not episode.success  # the red door was on the left, not in front


def test_a_skill_fails_when_its_object_is_gone():
    episode = _episode("BabyAI-PutNextLocal-v0", 1)  # a blue key at (4, 2), two ahead and one right
    skills = {s.name: s for s in build_skills(episode)}
    episode.world.grid.set(4, 2, None)  # taken away; the map still shows it
    assert skills["go_to"].invoke({"object": "the blue key"}) == "cannot find the blue key on the map"
    assert skills["go_to"].invoke({"object": "a key"})["did"] in ("facing the green key", "facing the yellow key",
                                                                   "facing the red key")


def test_a_call_naming_an_unseen_object_fails_plainly():
    episode = _episode("BabyAI-GoToObj-v0", 0)  # only a green key in the room
    skills = {s.name: s for s in build_skills(episode)}
    assert skills["go_to"].invoke({"object": "the red ball"}) == \
        "the arguments of go_to do not name objects seen so far"
    assert episode.steps == 0


# --- the loop -------------------------------------------------------------------------------------

def test_episode_with_a_scripted_plan():
    episode = _episode("BabyAI-GoToLocal-v0", 0)  # go to the green ball
    thinker = ScriptedThinker(_call("go_to", object="the green ball"))
    result = run_episode(episode, thinker)
    assert result.success and result.outcome == "success"
    assert result.planner_calls == 1
    assert [e["step"] for e in result.trace] == ["observe", "plan", "act", "check"]
    assert thinker.seen[0]["require_tool"] is True
    assert set(thinker.seen[0]["tools"]) == {"go_to", "pick_up", "put_next_to"}
    prompt = thinker.seen[0]["messages"][-1].content
    assert prompt.endswith("Mission:\ngo to the green ball")


class _Mover(ScriptedThinker):
    """Takes an object away while the planner thinks: the map still shows it where it was."""

    def __init__(self, episode: Episode, pos: tuple[int, int], *script: ThinkResult):
        super().__init__(*script)
        self.episode, self.pos = episode, pos

    def think(self, messages, **kwargs):
        if not self.seen:
            self.episode.world.grid.set(*self.pos, None)
        return super().think(messages, **kwargs)


def test_surprise_leads_to_a_new_plan():
    episode = _episode("BabyAI-GoToLocal-v0", 0)  # go to the green ball
    thinker = _Mover(episode, (4, 3),  # the red box
                     _call("go_to", object="the red box"), _call("go_to", object="the green ball"))
    result = run_episode(episode, thinker)
    assert result.success
    assert result.planner_calls == 2
    acted = [e for e in result.trace if e["step"] == "act"]
    assert acted[0]["result"] == "cannot find the red box on the map"
    assert "cannot find the red box" in thinker.seen[1]["messages"][0].content  # shown when replanning


def test_a_plan_that_ends_without_the_mission_is_not_offered_again():
    episode = _episode("BabyAI-GoToLocal-v0", 0)
    thinker = ScriptedThinker(_call("go_to", object="the red box"), _call("go_to", object="the green ball"))
    result = run_episode(episode, thinker)
    assert result.success and result.planner_calls == 2
    second = thinker.seen[1]["messages"]
    assert "is done but the mission is not" in second[0].content
    schemas = {s["name"]: s["parameters"]["properties"] for s in
               tool_schemas(build_skills(episode, spent=[("go_to", "the red box on your right")]))}
    assert not any("red box" in p for p in schemas["go_to"]["object"]["enum"])  # however it is named
    assert "the red box" in schemas["pick_up"]["object"]["enum"]  # other skills may still use it


def test_planner_calls_are_bounded():
    episode = _episode("BabyAI-GoToLocal-v0", 0)
    thinker = ScriptedThinker(*[ThinkResult("no call") for _ in range(3)])
    result = run_episode(episode, thinker, max_planner_calls=3)
    assert not result.success
    assert result.outcome == "out of planner calls" and result.planner_calls == 3


def test_tiny_backbone_writes_valid_skill_calls(tiny_profile):
    from graphs.thinker import BackboneThinker, ConditioningCache
    from models.mmllm import MMLLM

    thinker = BackboneThinker(MMLLM.from_profile(tiny_profile), ConditioningCache(), max_new_tokens=160)
    episode = _episode("BabyAI-GoToObj-v0", 0)
    plans = []

    def check(calls):  # against the schemas the planner was given, before anything runs
        schemas = {s["name"]: s["parameters"] for s in tool_schemas(build_skills(episode))}
        for call in calls:
            jsonschema.validate(call["args"], schemas[call["name"]])
        plans.append(calls)

    result = run_episode(episode, thinker, max_planner_calls=2, on_plan=check)
    assert result.planner_calls == len(plans) >= 1
    assert sum(len(p) for p in plans) >= 1  # random weights, but the grammar only lets real calls through


# --- the command ----------------------------------------------------------------------------------

def test_command_rejects_an_unknown_level(capsys):
    from agent.cli.main import main

    assert main(["embodied", "--env", "BabyAI-NoSuchLevel-v0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown BabyAI level 'BabyAI-NoSuchLevel-v0'") and err.count("\n") == 1
    assert main(["embodied", "--episodes", "0"]) == 2


def test_command_compares_policies_and_draws_episodes(tmp_path, capsys):
    import json

    from PIL import Image

    from agent.cli.main import main

    out = tmp_path / "embodied"
    assert main(["--profile", "tiny", "embodied", "--env", "BabyAI-GoToObj-v0", "--episodes", "2",
                 "--gif", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for policy in ("signalgraph", "random", "BabyAI bot"):
        assert policy in printed
    summary = json.loads((out / "results.json").read_text())["levels"]["BabyAI-GoToObj-v0"]["summary"]
    assert summary["BabyAI bot"]["success_rate"] == 1.0  # the ceiling
    assert summary["signalgraph"]["planner_calls_per_episode"] >= 1
    gif = Image.open(out / "BabyAI-GoToObj-v0.gif")
    assert gif.n_frames > 3 and gif.width > gif.height  # frames with the plan beside them
    assert Image.open(out / "comparison.png").format == "PNG"



def test_levels_run_one_at_a_time_add_up(tmp_path):
    import json

    from agent.cli.embodied import _earlier
    from agent.cli.main import main

    out = tmp_path / "embodied"
    run = ["--profile", "tiny", "embodied", "--episodes", "1", "--gif", "0", "--out", str(out)]
    assert main([*run, "--env", "BabyAI-GoToObj-v0"]) == 0
    assert main([*run, "--env", "BabyAI-OpenDoor-v0"]) == 0
    levels = json.loads((out / "results.json").read_text())["levels"]
    assert list(levels) == ["BabyAI-GoToObj-v0", "BabyAI-OpenDoor-v0"]
    assert _earlier(out / "results.json", "tiny", 5, 1)["levels"] == {}  # another seed: a fresh report


def test_a_pair_put_next_to_each_other_in_vain_is_not_offered_again():
    episode = _episode("BabyAI-PutNextLocal-v0", 1)  # put the yellow key next to the purple box
    episode.look_around()
    spent = [("put_next_to", "the yellow key", "the green ball")]
    parameters = {s["name"]: s["parameters"] for s in tool_schemas(build_skills(episode, spent))}["put_next_to"]
    assert not any("yellow key" in o for o in parameters["properties"]["object"]["enum"])  # were they swapped?
    jsonschema.validate({"object": "the green ball", "next_to": "the yellow key"}, parameters)

    spent.append(("put_next_to", "the green ball", "the yellow key"))  # no: the target was wrong, not the key
    parameters = {s["name"]: s["parameters"] for s in tool_schemas(build_skills(episode, spent))}["put_next_to"]
    assert not any("green ball" in o for o in parameters["properties"]["object"]["enum"])
    jsonschema.validate({"object": "the yellow key", "next_to": "the purple box"}, parameters)
    ball = [t for t in parameters["properties"]["next_to"]["enum"] if "green ball" in t]  # however it is named
    assert len(ball) > 2
    for target in ball:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"object": "the yellow key", "next_to": target}, parameters)
    jsonschema.validate({"object": "the yellow key", "next_to": "a ball"}, parameters)  # may be another ball
