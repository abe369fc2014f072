"""Generated KServe v2 gRPC stubs (see scripts/gen_kserve_stubs.sh)."""
