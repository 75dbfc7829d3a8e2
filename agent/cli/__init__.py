"""The command line: `signalgraph` and its subcommands (main.py holds the arguments)."""
