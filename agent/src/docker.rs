//! The few Docker Engine API calls a volume source needs, over the engine's Unix socket.
//!
//! Seven calls, each a small JSON request answered by a small JSON body: plain HTTP/1.0 over a
//! `UnixStream` (one request per connection, the body ends where the connection does, no
//! chunked encoding) does this in a page, where a client library would bring the whole Engine
//! API's types and an async HTTP stack into the agent's blocking paths.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

/// How long one call may take: a stop waits for the container's own stop timeout.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct Docker {
    pub socket: PathBuf,
}

/// A volume as the engine describes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Volume {
    pub name: String,
    pub driver: String,
    #[serde(default)]
    pub mountpoint: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
    /// Driver options (`type=nfs`, `o=bind`…): such a volume is mounted only while in use.
    #[serde(default, deserialize_with = "null_as_default")]
    pub options: BTreeMap<String, String>,
}

/// A container that mounts a volume.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Container {
    pub id: String,
    #[serde(default)]
    pub names: Vec<String>,
    /// created, running, paused, restarting, removing, exited or dead.
    pub state: String,
}

impl Container {
    /// Its name without Docker's leading '/' (its short id when it has none).
    pub fn name(&self) -> String {
        self.names.first().map(|n| n.trim_start_matches('/').to_string()).unwrap_or_else(|| self.id[..12].to_string())
    }
}

fn null_as_default<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Docker {
    pub fn new(socket: &Path) -> Docker {
        Docker { socket: socket.to_path_buf() }
    }

    /// One request; returns the status and the body.
    fn call(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> Result<(u16, Vec<u8>)> {
        let sock = self.socket.display();
        let mut s = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
                anyhow!("docker socket {sock}: {e} (is Docker running? set docker_socket in agent.toml)")
            }
            ErrorKind::PermissionDenied => anyhow!(
                "docker socket {sock}: permission denied (the agent's user must be allowed on it, e.g. in the docker group)"
            ),
            _ => anyhow!("docker socket {sock}: {e}"),
        })?;
        s.set_read_timeout(Some(CALL_TIMEOUT))?;
        s.set_write_timeout(Some(CALL_TIMEOUT))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.0\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).with_context(|| format!("docker socket {sock}: sending {method} {path}"))?;
        let mut response = Vec::new();
        s.read_to_end(&mut response).with_context(|| format!("docker socket {sock}: reading the answer to {path}"))?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| anyhow!("docker socket {sock}: not an HTTP answer to {method} {path}"))?;
        let head = String::from_utf8_lossy(&response[..split]);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("docker socket {sock}: no status in the answer to {method} {path}"))?;
        Ok((status, response[split + 4..].to_vec()))
    }

    /// A call that must succeed (2xx, or 304 "already so"); returns the body.
    fn expect(&self, method: &str, path: &str, body: Option<&serde_json::Value>, what: &str) -> Result<Vec<u8>> {
        let (status, body) = self.call(method, path, body)?;
        if (200..300).contains(&status) || status == 304 {
            return Ok(body);
        }
        bail!("docker: {what}: {} (HTTP {status})", engine_message(&body))
    }

    /// Every volume on this engine.
    pub fn volumes(&self) -> Result<Vec<Volume>> {
        #[derive(Deserialize)]
        struct List {
            #[serde(rename = "Volumes", default, deserialize_with = "null_as_default")]
            volumes: Vec<Volume>,
        }
        let body = self.expect("GET", "/volumes", None, "listing volumes")?;
        Ok(serde_json::from_slice::<List>(&body)
            .context("docker: the volume list is not what the API describes")?
            .volumes)
    }

    /// One volume, or None when there is no volume of that name.
    pub fn volume(&self, name: &str) -> Result<Option<Volume>> {
        let (status, body) = self.call("GET", &format!("/volumes/{}", encode(name)), None)?;
        match status {
            404 => Ok(None),
            200 => Ok(Some(serde_json::from_slice(&body).with_context(|| format!("docker: volume {name}"))?)),
            s => bail!("docker: volume {name}: {} (HTTP {s})", engine_message(&body)),
        }
    }

    pub fn create_volume(&self, name: &str, driver: &str, labels: &BTreeMap<String, String>) -> Result<Volume> {
        let body = serde_json::json!({ "Name": name, "Driver": driver, "Labels": labels });
        let out = self.expect("POST", "/volumes/create", Some(&body), &format!("creating volume {name}"))?;
        serde_json::from_slice(&out).with_context(|| format!("docker: the created volume {name}"))
    }

    /// Containers (running or not) that mount `volume`.
    pub fn containers_using(&self, volume: &str) -> Result<Vec<Container>> {
        let filters = serde_json::json!({ "volume": [volume] }).to_string();
        let path = format!("/containers/json?all=true&filters={}", encode(&filters));
        let body = self.expect("GET", &path, None, &format!("containers using volume {volume}"))?;
        serde_json::from_slice(&body).context("docker: the container list is not what the API describes")
    }

    /// The container's state now (None: it no longer exists).
    pub fn state(&self, id: &str) -> Result<Option<String>> {
        #[derive(Deserialize)]
        struct Inspect {
            #[serde(rename = "State")]
            state: State,
        }
        #[derive(Deserialize)]
        struct State {
            #[serde(rename = "Status")]
            status: String,
        }
        let (status, body) = self.call("GET", &format!("/containers/{}/json", encode(id)), None)?;
        match status {
            404 => Ok(None),
            200 => Ok(Some(serde_json::from_slice::<Inspect>(&body).context("docker: container state")?.state.status)),
            s => bail!("docker: container {id}: {} (HTTP {s})", engine_message(&body)),
        }
    }

    /// Whether the container was started with `--rm` (Docker deletes it once it stops).
    pub fn auto_remove(&self, id: &str) -> Result<bool> {
        #[derive(Deserialize)]
        struct Inspect {
            #[serde(rename = "HostConfig")]
            host: Host,
        }
        #[derive(Deserialize)]
        struct Host {
            #[serde(rename = "AutoRemove", default)]
            auto_remove: bool,
        }
        let body = self.expect("GET", &format!("/containers/{}/json", encode(id)), None, &format!("container {id}"))?;
        Ok(serde_json::from_slice::<Inspect>(&body).context("docker: container settings")?.host.auto_remove)
    }

    /// pause, unpause, stop or start.
    pub fn act(&self, action: &str, id: &str, name: &str) -> Result<()> {
        self.expect(
            "POST",
            &format!("/containers/{}/{action}", encode(id)),
            None,
            &format!("{action} container {name}"),
        )
        .map(drop)
    }
}

/// The engine's `{"message": …}`, or the body as text.
fn engine_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Message {
        message: String,
    }
    serde_json::from_slice::<Message>(body)
        .map(|m| m.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_string())
}

/// Percent-encode everything but unreserved characters (names and filter JSON in a path).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
