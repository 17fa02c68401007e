//! Throwaway database servers from Debian's packages, each on its own port on 127.0.0.1 with
//! its data in a test's temporary directory, stopped on drop.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// Run a command; panics with its output unless it succeeds. Returns stdout.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for(what: &str, log: &Path, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not start: {}", fs::read_to_string(log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A PostgreSQL cluster made with `initdb`, run by `pg_ctl` as the `postgres` user (both refuse
/// root). Local socket connections are trusted; TCP ones need the password.
pub struct Postgres {
    pub port: u16,
    pub socket_dir: PathBuf,
    pub bin: PathBuf,
    data: PathBuf,
}

impl Postgres {
    pub fn start(dir: &Path, superuser_password: &str) -> Postgres {
        let bin = fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is not installed (deploy/install-deps.sh installs it)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("no initdb under /usr/lib/postgresql");
        fs::create_dir_all(dir).expect("pg dir");
        // The postgres user must reach its directory through the test's private temp dir.
        let mut p = dir.to_path_buf();
        while p.pop() && p != Path::new("/") && p != std::env::temp_dir() {
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o755));
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let (data, socket_dir, pwfile) = (dir.join("data"), dir.join("sock"), dir.join("pw"));
        fs::write(&pwfile, format!("{superuser_password}\n")).expect("pwfile");
        fs::create_dir_all(&socket_dir).expect("sock dir");
        sh(Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir));
        let as_postgres = |prog: &str| {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(prog));
            c
        };
        sh(as_postgres("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display())));
        let port = free_port();
        let log = dir.join("server.log");
        sh(as_postgres("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
                socket_dir.display()
            ))
            .arg("start")
            .stdout(Stdio::null()));
        Postgres { port, socket_dir, bin, data }
    }

    /// A client tool of the cluster's version, connected through the trusted socket.
    pub fn tool(&self, prog: &str) -> Command {
        let mut c = Command::new(self.bin.join(prog));
        c.env("PGHOST", &self.socket_dir).env("PGPORT", self.port.to_string()).env("PGUSER", "postgres");
        c
    }

    /// Run SQL in `db`; rows as lines, columns separated by '|'.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        sh(self.tool("psql").args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql]))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A MariaDB server from `mariadb-install-db` (root over the socket, no password).
pub struct Mariadb {
    pub port: u16,
    pub socket: PathBuf,
    child: Child,
}

impl Mariadb {
    pub fn start(dir: &Path) -> Mariadb {
        let (data, socket, log) = (dir.join("data"), dir.join("mysql.sock"), dir.join("server.log"));
        fs::create_dir_all(&data).expect("data dir");
        sh(Command::new("mariadb-install-db")
            .args(["--no-defaults", "--user=root", "--skip-test-db", "--auth-root-authentication-method=normal"])
            .arg(format!("--datadir={}", data.display())));
        let port = free_port();
        let child = Command::new("mariadbd")
            .args(["--no-defaults", "--user=root", "--bind-address=127.0.0.1", "--skip-log-bin"])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--port={port}"))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-error={}", log.display()))
            .args(["--innodb-buffer-pool-size=32M", "--innodb-log-file-size=16M"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd");
        let m = Mariadb { port, socket, child };
        wait_for("mariadbd", &log, || m.client().args(["-e", "SELECT 1"]).output().is_ok_and(|o| o.status.success()));
        m
    }

    /// The client as root over the socket.
    pub fn client(&self) -> Command {
        let mut c = Command::new("mariadb");
        c.arg("--no-defaults").arg(format!("--socket={}", self.socket.display())).args(["-u", "root"]);
        c
    }

    /// Run SQL; rows as lines, columns separated by tabs.
    pub fn sql(&self, sql: &str) -> String {
        sh(self.client().args(["--batch", "--skip-column-names", "-e", sql]))
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `redis-server` with a password, keeping its files in `dir`.
pub struct Redis {
    pub port: u16,
    pub password: String,
    child: Child,
}

impl Redis {
    pub fn start(dir: &Path, password: &str) -> Redis {
        Redis::start_with(dir, password, &[])
    }

    /// The same, with more `redis-server` arguments (e.g. `--dbfilename`).
    pub fn start_with(dir: &Path, password: &str, extra: &[&str]) -> Redis {
        fs::create_dir_all(dir).expect("redis dir");
        let port = free_port();
        let log = dir.join("server.log");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .args(["--requirepass", password, "--dir"])
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let r = Redis { port, password: password.to_string(), child };
        wait_for("redis-server", &log, || r.cli(&["PING"]).trim() == "PONG");
        r
    }

    /// `redis-cli ARGS` against this server; stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--no-auth-warning"])
            .env("REDISCLI_AUTH", &self.password)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An SMTP server (aiosmtpd from Debian's python3-aiosmtpd) delivering into a maildir.
pub struct Smtp {
    pub port: u16,
    pub maildir: PathBuf,
    child: Child,
}

impl Smtp {
    pub fn start(dir: &Path) -> Smtp {
        fs::create_dir_all(dir).expect("smtp dir");
        let port = free_port();
        let maildir = dir.join("maildir");
        let log = dir.join("smtp.log");
        // Debian's interpreter: aiosmtpd is installed for it, not for another python3 on PATH.
        let child = Command::new("/usr/bin/python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}"), "-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("smtp log"))
            .spawn()
            .expect("start aiosmtpd (apt install python3-aiosmtpd)");
        wait_for("aiosmtpd", &log, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        Smtp { port, maildir, child }
    }

    /// The messages delivered so far, as text.
    pub fn messages(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.maildir.join("new"))
            .map(|d| d.flatten().map(|e| fs::read_to_string(e.path()).unwrap_or_default()).collect())
            .unwrap_or_default();
        out.sort();
        out
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An OpenSSH server (Debian's openssh-server) on a high port with its own host key, letting one
/// generated client key in with a forced command, as the install guide's authorized_keys does.
pub struct Sshd {
    pub port: u16,
    /// The client's private key.
    pub identity: PathBuf,
    /// A known_hosts file holding this server's host key.
    pub known_hosts: PathBuf,
    /// The server's public host key line ("ssh-ed25519 AAAA…").
    pub host_key: String,
    child: Child,
}

impl Sshd {
    /// Start sshd letting the client key run `forced_command` (and nothing else) as root.
    pub fn start(dir: &Path, forced_command: &str) -> Sshd {
        fs::create_dir_all(dir).expect("sshd dir");
        fs::create_dir_all("/run/sshd").expect("privilege separation dir");
        let keygen = |path: &Path| {
            sh(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "magpie-test", "-f"]).arg(path));
            fs::read_to_string(path.with_extension("pub")).expect("public key").trim().to_string()
        };
        let (host, client) = (dir.join("host_key"), dir.join("id_ed25519"));
        let host_key = keygen(&host);
        let client_key = keygen(&client);
        let authorized = dir.join("authorized_keys");
        fs::write(&authorized, format!("command=\"{forced_command}\",restrict {client_key}\n"))
            .expect("authorized_keys");
        let port = free_port();
        let known_hosts = dir.join("known_hosts");
        let host_key_line = host_key.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_key_line}\n")).expect("known_hosts");
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
                 PermitRootLogin forced-commands-only\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nStrictModes no\nLogLevel VERBOSE\n",
                host.display(),
                authorized.display(),
                dir.join("sshd.pid").display()
            ),
        )
        .expect("sshd_config");
        let log = dir.join("sshd.log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("sshd log"))
            .spawn()
            .expect("start sshd (apt install openssh-server)");
        wait_for("sshd", &log, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        Sshd { port, identity: client, known_hosts, host_key: host_key_line, child }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An S3-compatible server (moto's server mode, from PyPI) on 127.0.0.1 with one bucket.
pub struct S3Server {
    pub port: u16,
    pub bucket: String,
    child: Child,
}

impl S3Server {
    pub fn start(dir: &Path, bucket: &str) -> S3Server {
        fs::create_dir_all(dir).expect("s3 dir");
        let port = free_port();
        let log = dir.join("moto.log");
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("moto log"))
            .spawn()
            .expect("start moto (python3 -m pip install 'moto[server]')");
        let s = S3Server { port, bucket: bucket.to_string(), child };
        // moto takes unsigned requests: a plain PUT makes the bucket, once the server answers
        // (it accepts connections a little before it serves them).
        wait_for("moto", &log, || {
            Command::new("curl")
                .args(["-sf", "-X", "PUT"])
                .arg(s.url(bucket))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|st| st.success())
        });
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, key: &str) -> String {
        format!("{}/{key}", self.endpoint())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway Docker engine (Debian's docker.io): its own socket, data root and exec root in a
/// temporary directory, no bridge network and no iptables rules (the tests' containers need no
/// network), and a tiny image made here with `docker import` from Debian's busybox-static.
pub struct Dockerd {
    pub dir: PathBuf,
    child: Child,
}

/// The image every test container runs: busybox and its applets, nothing else.
pub const BUSYBOX_IMAGE: &str = "magpie-busybox:test";

impl Dockerd {
    pub fn start(dir: &Path) -> Dockerd {
        fs::create_dir_all(dir).expect("docker dir");
        let log = dir.join("dockerd.log");
        let child = Command::new("dockerd")
            .arg("--host")
            .arg(format!("unix://{}", dir.join("docker.sock").display()))
            .arg("--data-root")
            .arg(dir.join("root"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("dockerd log"))
            .spawn()
            .expect("start dockerd (apt-get install docker.io)");
        let d = Dockerd { dir: dir.to_path_buf(), child };
        wait_for("dockerd", &log, || d.cli().arg("version").output().is_ok_and(|o| o.status.success()));
        let rootfs = dir.join("image/bin");
        fs::create_dir_all(&rootfs).expect("image dir");
        fs::copy("/bin/busybox", rootfs.join("busybox")).expect("busybox (apt-get install busybox-static)");
        for applet in ["sh", "sleep", "echo", "cat", "cp", "mv", "rm", "mkdir", "head", "dd", "seq"] {
            std::os::unix::fs::symlink("busybox", rootfs.join(applet)).expect("applet link");
        }
        sh(Command::new("tar").arg("-C").arg(dir.join("image")).arg("-cf").arg(dir.join("image.tar")).arg("."));
        sh(d.cli().arg("import").arg(dir.join("image.tar")).arg(BUSYBOX_IMAGE));
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// `docker` talking to this engine.
    pub fn cli(&self) -> Command {
        let mut c = Command::new("docker");
        c.arg("--host").arg(format!("unix://{}", self.socket().display()));
        c
    }

    /// Run `docker ARGS` and return its trimmed output (panics on failure).
    pub fn run(&self, args: &[&str]) -> String {
        sh(self.cli().args(args)).trim().to_string()
    }

    /// A container's state: running, paused, exited…
    pub fn state(&self, container: &str) -> String {
        self.run(&["inspect", "-f", "{{.State.Status}}", container])
    }

    /// Where a volume's files are.
    pub fn mountpoint(&self, volume: &str) -> PathBuf {
        PathBuf::from(self.run(&["volume", "inspect", "-f", "{{.Mountpoint}}", volume]))
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // Containers first (their shims would outlive the engine), then the engine itself.
        if let Ok(o) = self.cli().args(["ps", "-aq"]).output() {
            let ids: Vec<String> = String::from_utf8_lossy(&o.stdout).split_whitespace().map(String::from).collect();
            if !ids.is_empty() {
                let _ = self.cli().args(["rm", "-f"]).args(&ids).output();
            }
        }
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
