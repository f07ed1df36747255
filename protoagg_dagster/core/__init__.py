"""Pure logic of protoagg: no Dagster, no network. Records, framing, planning, settings, errors."""
