"""CLI sub-commands, discovered by ``clipforge.cli``; one module per command."""
