"""`signalgraph embodied`: the backbone plans skills in BabyAI levels, compared in the same run with
a random policy and the BabyAI bot that ships with minigrid (the ceiling).

Prints success rate, mean steps and planner calls per level and policy; writes `results.json`, a
GIF per level of chosen episodes (the first few, and the first failure) with the plan beside the
frames, and `comparison.png`, a bar chart of the three policies. Levels run one command at a time
into the same folder (same profile, seed and episodes) add up in `results.json` and the chart.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from models.errors import ConfigError

POLICIES = ("signalgraph", "random", "BabyAI bot")
_PANEL = 360  # pixels of text beside each frame
_FRAME = 320  # the longest side of a frame in the GIF


@dataclass
class Outcome:
    seed: int
    mission: str
    success: bool
    steps: int
    planner_calls: int = 0
    path_replans: int = 0
    end: str = ""
    plans: list[list[str]] = field(default_factory=list)


class Film:
    """Frames of one episode with what the planner had decided at each, for the GIF."""

    def __init__(self, env, level: str, seed: int, mission: str):
        self.env, self.level, self.seed, self.mission = env, level, seed, mission
        self.plans: list[list[str]] = []
        self.current = -1
        self.frames: list[tuple[np.ndarray, int, int, int]] = []  # frame, plans so far, running index, step

    def plan(self, calls: list[dict]) -> None:
        from graphs.embodied import call_text

        self.plans.append([call_text(c) for c in calls])
        self.current = -1

    def skill(self, index: int) -> None:
        self.current = index

    def shoot(self, episode) -> None:
        self.frames.append((_scaled(self.env.render()), len(self.plans), self.current, episode.steps))

    def images(self, result: str):
        """PIL frames: the environment on the left, mission and plan on the right."""
        from PIL import Image, ImageDraw, ImageFont

        font = ImageFont.load_default(size=13)
        images = []
        for n, (frame, plans, current, step) in enumerate(self.frames):
            height = max(frame.shape[0], 200)
            canvas = Image.new("RGB", (frame.shape[1] + _PANEL, height), "white")
            canvas.paste(Image.fromarray(frame), (0, 0))
            lines = [f"{self.level}  seed {self.seed}", f"mission: {self.mission}", f"step {step}", ""]
            if plans:
                plan = self.plans[plans - 1]
                lines.append(f"plan {plans}:" if plan else f"plan {plans}: no skill call")
                lines += [("> " if i == current else "  ") + call for i, call in enumerate(plan)]
            else:
                lines.append("(looking around)")
            if n == len(self.frames) - 1:
                lines += ["", result]
            draw = ImageDraw.Draw(canvas)
            y = 8
            for line in lines:
                for part in _wrap(line, 44):
                    draw.text((frame.shape[1] + 10, y), part, fill="black", font=font)
                    y += 17
            images.append(canvas)
        return images


def _scaled(frame: np.ndarray) -> np.ndarray:
    from PIL import Image

    side = max(frame.shape[:2])
    if side <= _FRAME:
        return frame
    size = (frame.shape[1] * _FRAME // side, frame.shape[0] * _FRAME // side)
    return np.asarray(Image.fromarray(frame).resize(size, Image.NEAREST))


def _wrap(text: str, width: int) -> list[str]:
    parts = []
    while len(text) > width:
        cut = text.rfind(" ", 0, width)
        cut = cut if cut > 0 else width
        parts.append(text[:cut])
        text = "    " + text[cut:].lstrip()
    return parts + [text]


def _write_gif(films: list[tuple[Film, str]], path: Path) -> None:
    frames, durations = [], []
    for film, result in films:
        images = film.images(result)
        frames += images
        durations += [250] * (len(images) - 1) + [1500]  # hold each episode's end
    if not frames:
        return
    width = max(f.width for f in frames)
    height = max(f.height for f in frames)
    from PIL import Image

    padded = []
    for frame in frames:  # one size for all (levels differ in grid size)
        canvas = Image.new("RGB", (width, height), "white")
        canvas.paste(frame, (0, 0))
        padded.append(canvas)
    padded[0].save(path, save_all=True, append_images=padded[1:], duration=durations, loop=0)


def _signalgraph(env, level: str, seeds: list[int], thinker, gif: int, progress) -> tuple[list[Outcome], list]:
    from graphs.embodied import run_episode
    from tools.babyai_skills import Episode

    outcomes, chosen, failure_shown = [], [], False
    for seed in progress(seeds, desc=f"{level} signalgraph"):
        episode = Episode(env, seed)
        film = Film(env, level, seed, episode.mission)
        episode.on_step = film.shoot
        film.shoot(episode)
        result = run_episode(episode, thinker, on_plan=film.plan, on_skill=film.skill)
        outcomes.append(Outcome(seed, result.mission, result.success, result.steps, result.planner_calls,
                                result.path_replans, result.outcome, film.plans))
        shown = f"{result.outcome} after {result.steps} steps, {result.planner_calls} planner call(s)"
        if len(chosen) < gif or (not result.success and not failure_shown):
            chosen.append((film, shown))
            failure_shown |= not result.success
    return outcomes, chosen


def _random(env, seeds: list[int], progress, level: str) -> list[Outcome]:
    from tools.babyai_skills import Episode, EpisodeOver

    outcomes = []
    for seed in progress(seeds, desc=f"{level} random"):
        episode = Episode(env, seed)
        rng = np.random.default_rng(seed)
        try:
            while True:
                episode.act(int(rng.integers(env.action_space.n)))
        except EpisodeOver:
            pass
        outcomes.append(Outcome(seed, episode.mission, episode.success, episode.steps))
    return outcomes


def _bot(env, seeds: list[int], progress, level: str) -> list[Outcome]:
    from minigrid.utils.baby_ai_bot import BabyAIBot

    from tools.babyai_skills import Episode, EpisodeOver

    outcomes = []
    for seed in progress(seeds, desc=f"{level} BabyAI bot"):
        episode = Episode(env, seed)
        bot = BabyAIBot(env)
        end = ""
        try:
            while True:
                episode.act(bot.replan())
        except EpisodeOver:
            pass
        except AssertionError as exc:  # the bot's own consistency checks; counted as a failure
            end = f"bot error: {exc}"
        outcomes.append(Outcome(seed, episode.mission, episode.success, episode.steps, end=end))
    return outcomes


def _summary(outcomes: list[Outcome]) -> dict:
    n = len(outcomes)
    return {"episodes": n, "success_rate": sum(o.success for o in outcomes) / n,
            "mean_steps": sum(o.steps for o in outcomes) / n,
            "planner_calls_per_episode": sum(o.planner_calls for o in outcomes) / n,
            "path_replans_per_episode": sum(o.path_replans for o in outcomes) / n}


def _chart(summaries: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    levels = list(summaries)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(levels), 3.4), dpi=100)
    width = 0.8 / len(POLICIES)
    x = np.arange(len(levels))
    for i, policy in enumerate(POLICIES):
        success = axes[0].bar(x + i * width, [100 * summaries[lv][policy]["success_rate"] for lv in levels], width,
                              label=policy)
        steps = axes[1].bar(x + i * width, [summaries[lv][policy]["mean_steps"] for lv in levels], width,
                            label=policy)
        axes[0].bar_label(success, fmt="%.0f", fontsize=6)
        axes[1].bar_label(steps, fmt="%.0f", fontsize=6)
    for ax, title in zip(axes, ("success (%)", "mean steps (log scale)")):
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x + width * (len(POLICIES) - 1) / 2)
        ax.set_xticklabels([lv.removeprefix("BabyAI-").removesuffix("-v0") for lv in levels], fontsize=8,
                           rotation=20)
    axes[0].set_ylim(0, 110)
    axes[1].set_yscale("log")  # a random walk takes tens of times the steps of a plan
    axes[1].yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    axes[1].yaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes[1].yaxis.set_minor_formatter(NullFormatter())
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(POLICIES), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def _earlier(path: Path, profile: str, seed: int, episodes: int) -> dict:
    """The report of an earlier run into the same folder with the same profile, seed and episodes,
    so levels run one command at a time add up to one table and one chart; else a fresh report."""
    fresh = {"profile": profile, "seed": seed, "episodes": episodes, "levels": {}}
    if not path.exists():
        return fresh
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError:
        return fresh
    same = (report.get("profile"), report.get("seed"), report.get("episodes")) == (profile, seed, episodes)
    return report if same else fresh


def embodied(args) -> int:
    from tqdm.auto import tqdm

    from graphs.thinker import BackboneThinker, ConditioningCache
    from models.mmllm import MMLLM
    from models.profiles import check_ready, load_profile
    from tools.babyai_skills import make_env

    if args.episodes < 1:
        raise ConfigError(f"--episodes must be at least 1, got {args.episodes}")
    if args.gif < 0:
        raise ConfigError(f"--gif must be 0 or more, got {args.gif}")
    levels = list(dict.fromkeys(args.env or ["BabyAI-GoToLocal-v0"]))
    envs = {level: make_env(level) for level in levels}  # a wrong name fails before the model loads
    profile = load_profile(args.profile)
    check_ready(profile)
    thinker = BackboneThinker(MMLLM.from_profile(profile), ConditioningCache(), max_new_tokens=160)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + args.episodes))

    def progress(items, desc):
        return tqdm(items, desc=desc, leave=False)

    report = _earlier(out / "results.json", profile.name, args.seed, args.episodes)
    summaries: dict[str, dict[str, dict]] = {lv: r["summary"] for lv, r in report["levels"].items()}
    for level, env in envs.items():
        ours, chosen = _signalgraph(env, level, seeds, thinker, args.gif, progress)
        runs = {"signalgraph": ours, "random": _random(env, seeds, progress, level),
                "BabyAI bot": _bot(env, seeds, progress, level)}
        summaries[level] = {policy: _summary(outcomes) for policy, outcomes in runs.items()}
        report["levels"][level] = {"summary": summaries[level],
                                   "episodes": {p: [asdict(o) for o in outcomes] for p, outcomes in runs.items()}}
        gif = out / f"{level}.gif"
        _write_gif(chosen, gif)
        print(f"\n{level}: {args.episodes} episodes from seed {args.seed} (profile {profile.name})")
        print(f"  {'policy':<12} {'success':>8} {'mean steps':>11} {'planner calls':>14}")
        for policy in POLICIES:
            s = summaries[level][policy]
            calls = f"{s['planner_calls_per_episode']:.2f}/episode" if policy == "signalgraph" else "-"
            print(f"  {policy:<12} {100 * s['success_rate']:>7.1f}% {s['mean_steps']:>11.1f} {calls:>14}")
        print(f"  episodes drawn: {gif}")
    (out / "results.json").write_text(json.dumps(report, indent=1))
    _chart(summaries, out / "comparison.png")
    print(f"\nresults: {out / 'results.json'}; chart: {out / 'comparison.png'}")
    return 0
