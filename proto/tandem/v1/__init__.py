"""Generated protobuf and gRPC code of tandem.v1 (`make proto`; committed, checked for staleness)."""
