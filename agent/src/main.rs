//! `agent`: serves a main server's sources to the collector. Its gRPC service, sources and
//! dump drivers arrive with the pull issue; until then it only says so.

fn main() -> std::process::ExitCode {
    eprintln!(
        "agent {}: not implemented yet; this build only has the repository and the collector's repository commands",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
