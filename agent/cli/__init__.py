"""The command line: `signalgraph` and its subcommands (main.py holds the arguments)."""


def main(argv: list[str] | None = None) -> int:
    """`signalgraph`, for entry-point scripts installed as `agent.cli:main` before the CLI had its
    own package (importing main.py here would run it twice under `python -m agent.cli.main`)."""
    from agent.cli.main import main as run

    return run(argv)
