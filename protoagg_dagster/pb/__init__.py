"""Generated protobuf code for proto/log.proto (regenerate with generate.sh)."""
