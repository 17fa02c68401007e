//! `collector certs`: a private CA and the certificates of agents and collectors.
//!
//! Agents get ServerAuth leaves with their host names as SANs (rustls ignores the CN); the
//! collector gets a ClientAuth leaf. Every file is written 0600, and each leaf's SHA-256
//! fingerprint is printed for pinning in `agent.toml`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create the private CA (ca.pem, ca-key.pem) in DIR.
    Init {
        #[command(flatten)]
        common: Common,
        /// CA name.
        #[arg(long, default_value = "magpie CA")]
        name: String,
    },
    /// Issue a certificate signed by the CA in DIR.
    Issue {
        /// `agent` (server certificate) or `collector` (client certificate).
        #[arg(value_parser = ["agent", "collector"])]
        role: String,
        /// Certificate name: files NAME.pem and NAME-key.pem.
        name: String,
        /// Host names or IP addresses the agent is reached by (agents: at least one).
        #[arg(long = "san")]
        sans: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Print the SHA-256 fingerprint of a certificate, for pinning.
    Fingerprint {
        /// A PEM certificate file.
        cert: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct Common {
    /// Folder of the CA and the issued files.
    #[arg(long, default_value = "/etc/magpie/certs")]
    dir: PathBuf,
    /// Validity in days from now (CA: 3650, leaves: 397 unless given).
    #[arg(long)]
    days: Option<i64>,
    /// Start of validity, YYYY-MM-DD (with --valid-until, instead of --days).
    #[arg(long, requires = "valid_until")]
    valid_from: Option<String>,
    /// End of validity, YYYY-MM-DD.
    #[arg(long, requires = "valid_from")]
    valid_until: Option<String>,
}

impl Common {
    fn validity(&self, default_days: i64) -> Result<(OffsetDateTime, OffsetDateTime)> {
        if let (Some(from), Some(until)) = (&self.valid_from, &self.valid_until) {
            let (from, until) = (parse_day(from)?, parse_day(until)?);
            if until <= from {
                bail!("--valid-until must be after --valid-from");
            }
            return Ok((from, until));
        }
        let days = self.days.unwrap_or(default_days);
        if !(1..=36500).contains(&days) {
            bail!("--days must be between 1 and 36500");
        }
        let now = OffsetDateTime::now_utc();
        // A minute of slack for clocks slightly behind ours.
        Ok((now - Duration::minutes(1), now + Duration::days(days)))
    }
}

fn parse_day(s: &str) -> Result<OffsetDateTime> {
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .with_context(|| format!("{s:?} is not a date like 2027-01-31"))?;
    use chrono::Datelike;
    let month = time::Month::try_from(d.month() as u8)?;
    Ok(time::Date::from_calendar_date(d.year(), month, d.day() as u8)?.midnight().assume_utc())
}

/// `sha256:` and the hex SHA-256 of a certificate's DER: the form `agent.toml` pins.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

/// Write a new file, 0600 from its creation; never replaces or follows an existing name.
fn write_private(path: &Path, data: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).with_context(|| {
        format!("cannot create {} (if it exists, remove it first if you mean to replace it)", path.display())
    })?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

pub fn run(cmd: CertsCommand) -> Result<()> {
    match cmd {
        CertsCommand::Init { common, name } => init(&common, &name),
        CertsCommand::Issue { role, name, sans, common } => issue(&common, &role, &name, &sans),
        CertsCommand::Fingerprint { cert } => {
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let der = CertificateDer::from_pem_file(&cert)
                .with_context(|| format!("{} holds no PEM certificate", cert.display()))?;
            println!("{}", fingerprint(&der));
            Ok(())
        }
    }
}

fn init(common: &Common, name: &str) -> Result<()> {
    fs::create_dir_all(&common.dir).with_context(|| format!("cannot create {}", common.dir.display()))?;
    let (cert_path, key_path) = (common.dir.join("ca.pem"), common.dir.join("ca-key.pem"));
    if cert_path.exists() || key_path.exists() {
        bail!("a CA already exists in {}", common.dir.display());
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    (params.not_before, params.not_after) = common.validity(3650)?;
    let cert = params.self_signed(&key)?;
    write_private(&key_path, &key.serialize_pem())?;
    write_private(&cert_path, &cert.pem())?;
    println!("CA written to {} (keep {} offline if you can)", cert_path.display(), key_path.display());
    println!("fingerprint {}", fingerprint(cert.der()));
    Ok(())
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "magpie");
    dn
}

fn issue(common: &Common, role: &str, name: &str, sans: &[String]) -> Result<()> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("certificate name {name:?} must be a plain file name");
    }
    let ca_pem = fs::read_to_string(common.dir.join("ca.pem")).with_context(|| {
        format!("no CA in {}: run `collector certs init --dir {}` first", common.dir.display(), common.dir.display())
    })?;
    let ca_key =
        KeyPair::from_pem(&fs::read_to_string(common.dir.join("ca-key.pem")).context("cannot read ca-key.pem")?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let sans: Vec<String> = if role == "collector" && sans.is_empty() { vec![name.to_string()] } else { sans.to_vec() };
    if role == "agent" && sans.is_empty() {
        bail!("an agent certificate needs at least one --san: the host name or address the collector connects to");
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans.clone())?;
    params.distinguished_name = dn(name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![if role == "agent" { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
    (params.not_before, params.not_after) = common.validity(397)?;
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (common.dir.join(format!("{name}.pem")), common.dir.join(format!("{name}-key.pem")));
    if cert_path.exists() || key_path.exists() {
        bail!(
            "{} or {} exists; remove both first if you mean to replace them",
            cert_path.display(),
            key_path.display()
        );
    }
    write_private(&key_path, &key.serialize_pem())?;
    write_private(&cert_path, &cert.pem())?;
    println!(
        "{role} certificate {} (SANs: {}) valid {} to {}",
        cert_path.display(),
        sans.join(", "),
        params.not_before.date(),
        params.not_after.date()
    );
    println!("fingerprint {}", fingerprint(cert.der()));
    Ok(())
}
