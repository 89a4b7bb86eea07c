"""The `clipdex` command line: one entry point, a subcommand per job (`clipdex --help`).

The edge of the project: it parses flags into the core's configuration objects, draws
progress, prints results, and turns core errors into one-line messages and exit codes.
Nothing below it (retrieval, indexer, api) prints or exits.
"""
