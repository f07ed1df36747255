#!/usr/bin/env bash
# Regenerates the *_pb2.py / *_pb2.pyi modules from proto/*.proto (log.proto: the `log` format's
# ProtoLog; record.proto: the `record` format's KafkaRecord) with the protoc bundled in
# grpcio-tools (a dev dependency), so the checked-in code matches the pinned protobuf runtime.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-"$root/.venv/bin/python"}
cd "$root"
"$python" -m grpc_tools.protoc -I proto --python_out=protoagg_dagster/pb \
  --pyi_out=protoagg_dagster/pb proto/log.proto proto/record.proto
echo "generated protoagg_dagster/pb/{log,record}_pb2.py and .pyi"
