//! `agent check-config`: a bad configuration is refused with one line naming the problem.

use std::process::Command;

fn check(toml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("agent.toml");
    std::fs::write(&p, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agent")).args(["check-config", "--config"]).arg(&p).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_configurations_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["c.pem", "k.pem", "ca.pem"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    let tls = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
        dir.path().join("c.pem"),
        dir.path().join("k.pem"),
        dir.path().join("ca.pem")
    );
    let (ok, err) = check(&format!("listen = \"127.0.0.1:1\"\n{tls}allowed_collectors = []\n"));
    assert!(!ok && err.contains("allowed_collectors is empty"), "{err}");
    let (ok, err) = check(&format!("listen = \"127.0.0.1:1\"\n{tls}allowed_collectors = [\"bob\"]\n"));
    assert!(!ok && err.contains("64 hex digits"), "{err}");
    let src = "[[source]]\nname = \"s\"\nkind = \"path\"\nroots = [\"relative/path\"]\n";
    let (ok, err) = check(&format!("listen = \"127.0.0.1:1\"\n{tls}allowed_collectors = [\"san:x\"]\n{src}"));
    assert!(!ok && err.contains("absolute"), "{err}");
    let (ok, err) =
        check(&format!("listen = \"127.0.0.1:1\"\nunknown_key = 1\n{tls}allowed_collectors = [\"san:x\"]\n"));
    assert!(!ok && err.contains("unknown"), "{err}");
    let (ok, err) = check(&format!("listen = \"127.0.0.1:1\"\n{tls}allowed_collectors = [\"san:x\"]\n"));
    assert!(!ok && err.contains(".pem holds no certificate"), "an unparsable certificate file is named: {err}");
    // A setting of another kind is refused, not ignored; so is a bad value of a dump setting.
    let base = format!("listen = \"127.0.0.1:1\"\n{tls}allowed_collectors = [\"san:x\"]\n");
    for (src, want) in [
        (
            "name = \"p\"\nkind = \"path\"\nroots = [\"/tmp\"]\ndatabases = \"*\"\n",
            "`databases` does not apply to kind \"path\"",
        ),
        (
            "name = \"d\"\nkind = \"postgres\"\nrow_counts = \"some\"\n",
            "row_counts = \"some\" must be \"exact\" or \"estimate\"",
        ),
        ("name = \"c\"\nkind = \"command\"\n", "kind command needs `command"),
        ("name = \"q\"\nkind = \"sqlite\"\npath = \"relative.db\"\n", "must be absolute"),
        ("name = \"x\"\nkind = \"oracle\"\n", "kind \"oracle\" is unknown"),
    ] {
        let (ok, err) = check(&format!("{base}[[source]]\n{src}"));
        assert!(!ok && err.contains(want), "{want}: {err}");
    }
}
