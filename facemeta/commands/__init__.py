"""One module per `facemeta` subcommand; each defines `add_parser(subparsers)` and `run(args) -> int`."""
