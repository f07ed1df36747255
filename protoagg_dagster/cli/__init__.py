"""The `protoagg` command, one module per verb group."""
