"""Built-in configuration profiles, one TOML file each (selected with ``--profile NAME``)."""
