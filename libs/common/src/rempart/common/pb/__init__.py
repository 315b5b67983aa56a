"""Generated protobuf code: run `make proto`."""
