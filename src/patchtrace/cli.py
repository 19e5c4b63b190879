"""Command-line interface (placeholder; replaced by the CLI module)."""


def main() -> None:
    raise SystemExit("patchtrace CLI is not built yet")
