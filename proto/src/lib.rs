//! Generated gRPC code for the agent protocol lands here with the pull issue (P2).
