//! The report of a run, as text, and its mail: SMTP with STARTTLS, implicit TLS or (on a trusted
//! network) none, with credentials; or the local sendmail.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{Message, SendmailTransport, SmtpTransport, Transport};

use crate::config::MailConfig;
use crate::run::RunOutcome;

pub fn subject(out: &RunOutcome) -> String {
    let failed = out.failed_sources().count();
    let what = match out.outcome.as_str() {
        "ok" => "ok".to_string(),
        "warnings" => "warnings".to_string(),
        _ if failed > 0 => format!("FAILED ({failed} of {} sources)", out.sources.len()),
        _ => "FAILED (repository)".to_string(),
    };
    format!("[magpie] {}: backup {what}", out.host)
}

/// The report: each source's result, the error text, its last good snapshot and age.
pub fn body(out: &RunOutcome) -> String {
    let mut b = String::new();
    let _ = writeln!(b, "magpie run on {} at {} ({:.0} s): {}", out.host, out.started, out.duration_secs, out.outcome);
    let _ = writeln!(b);
    let mut sources: Vec<_> = out.sources.iter().collect();
    // Failures first: the reader's eye lands on them.
    sources.sort_by_key(|s| (!matches!(s.status.as_str(), "failed" | "stale"), s.agent.clone(), s.source.clone()));
    for s in sources {
        let name = if s.source.is_empty() { s.agent.clone() } else { format!("{}/{}", s.agent, s.source) };
        let _ = writeln!(b, "{name}: {}", s.status.to_uppercase());
        if let Some(e) = &s.error {
            let _ = writeln!(b, "    error: {e}");
        }
        if let Some(id) = &s.snapshot {
            let _ = writeln!(
                b,
                "    snapshot {} ({} bytes added, {:.1} s)",
                &id[..8.min(id.len())],
                s.bytes_added,
                s.duration_secs
            );
        }
        match (&s.last_good, s.last_good_age_hours) {
            (Some(id), Some(age)) => {
                let _ = writeln!(
                    b,
                    "    last good snapshot: {} of {} ({age:.1} hours ago)",
                    &id[..8.min(id.len())],
                    s.last_good_time.as_deref().unwrap_or("?")
                );
            }
            _ if s.status == "failed" => {
                let _ = writeln!(b, "    last good snapshot: none");
            }
            _ => {}
        }
        for w in s.warnings.iter().take(10) {
            let _ = writeln!(b, "    warning: {w}");
        }
        if s.warnings.len() > 10 {
            let _ = writeln!(b, "    … {} more warnings", s.warnings.len() - 10);
        }
    }
    let _ = writeln!(b);
    for r in &out.repository {
        let _ = writeln!(b, "repository: {r}");
    }
    let _ = writeln!(
        b,
        "repository: {} bytes; {} snapshots pruned; {} bytes freed; check {}{}",
        out.repository_bytes,
        out.snapshots_pruned,
        out.bytes_freed,
        if out.check_clean { "clean" } else { "FOUND DAMAGE" },
        match out.verified_slice {
            Some((i, n)) => format!(", packs of slice {} of {n} verified ({} blobs)", i + 1, out.blobs_verified),
            None => String::new(),
        }
    );
    b
}

pub fn send(m: &MailConfig, out: &RunOutcome) -> Result<()> {
    let mut builder = Message::builder().from(m.from.parse().with_context(|| format!("mail.from {:?}", m.from))?);
    for to in &m.to {
        builder = builder.to(to.parse().with_context(|| format!("mail.to {to:?}"))?);
    }
    let email = builder.subject(subject(out)).header(ContentType::TEXT_PLAIN).body(body(out))?;
    match &m.smtp {
        Some(server) => {
            let (host, port) = server
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .ok_or_else(|| anyhow!("mail.smtp {server:?} must be host:port"))?;
            let mut t = match m.security.as_str() {
                "tls" => SmtpTransport::relay(host)?,
                "none" => SmtpTransport::builder_dangerous(host),
                _ => SmtpTransport::starttls_relay(host)?,
            }
            .port(port)
            .timeout(Some(Duration::from_secs(30)));
            if let Some(user) = &m.user {
                let pw = match &m.password_file {
                    Some(p) => std::fs::read_to_string(p)
                        .with_context(|| format!("mail.password_file {}", p.display()))?
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                    None => String::new(),
                };
                t = t.credentials(Credentials::new(user.clone(), pw));
            }
            t.build().send(&email).with_context(|| format!("sending mail through {server}"))?;
        }
        None => {
            let program = m.sendmail.clone().unwrap_or_else(|| "/usr/sbin/sendmail".into());
            SendmailTransport::new_with_command(&program)
                .send(&email)
                .with_context(|| format!("sending mail with {}", program.display()))?;
        }
    }
    Ok(())
}
