#!/usr/bin/env bash
# Regenerate the KServe v2 gRPC stubs (turbine/frontend/kserve_proto/grpc_service_pb2{,_grpc}.py{,i})
# from grpc_service.proto. Needs grpcio-tools (the dev extra). Run from anywhere:
#   scripts/gen_kserve_stubs.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
out="$root/turbine/frontend/kserve_proto"
cd "$out"
"$python" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  grpc_service.proto
# grpc_tools writes `import grpc_service_pb2`; make it a package-relative import.
sed -i 's/^import grpc_service_pb2 as /from . import grpc_service_pb2 as /' grpc_service_pb2_grpc.py
# Build the descriptors into a private pool, not protobuf's default one: tritonclient registers the
# same `inference.*` names in the default pool, and a process (a test run) may import both.
sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile(/_descriptor_pool.DescriptorPool().AddSerializedFile(/' \
  grpc_service_pb2.py
grep -q 'DescriptorPool().AddSerializedFile' grpc_service_pb2.py
echo "regenerated stubs in $out"
