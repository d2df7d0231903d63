"""``python -m histopilot`` runs the CLI."""

from histopilot.cli import main

main()
