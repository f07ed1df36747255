#!/usr/bin/env bash
# Regenerates log_pb2.py / log_pb2.pyi from proto/log.proto with the protoc bundled in grpcio-tools
# (a dev dependency), so the checked-in code matches the pinned protobuf runtime.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-"$root/.venv/bin/python"}
cd "$root"
"$python" -m grpc_tools.protoc -I proto --python_out=protoagg_dagster/pb \
  --pyi_out=protoagg_dagster/pb proto/log.proto
echo "generated protoagg_dagster/pb/log_pb2.py and log_pb2.pyi"
