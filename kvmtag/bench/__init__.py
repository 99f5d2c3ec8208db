"""kvmtag's benchmark suite: `python -m kvmtag.bench` (see __main__ for the command line)."""
