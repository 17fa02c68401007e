//! magpie's agent protocol, `magpie.agent.v1`: generated tonic/prost code and nothing else.

/// Protocol version spoken by this build (HandshakeRequest/Response.protocol).
pub const PROTOCOL_VERSION: u32 = 1;

/// The generated service and messages.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("magpie.agent.v1");
}
