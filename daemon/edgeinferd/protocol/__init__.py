"""Protocol adapters: convert protobuf to data-plane calls and back, nothing more."""
