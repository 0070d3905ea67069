"""Local TF-Serving-protocol gRPC server, client and model sync (sees only SavedModels and protos)."""
