//! Certificates generated per test: a CA, a server certificate for
//! 127.0.0.1/localhost, and a client certificate for mutual TLS.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use etcd_client::{Certificate, Identity, TlsOptions};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// The CA, kept to sign replacement client certificates.
    ca: Arc<(rcgen::Certificate, KeyPair)>,
    _dir: Arc<tempfile::TempDir>,
}

impl TlsMaterial {
    pub fn generate() -> Result<Self> {
        // Both of rustls's providers are compiled in (zookeeper-client's
        // TLS brings aws-lc-rs): this process's etcd clients need one picked.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::Builder::new()
            .prefix("etcd-syncer-tls-")
            .tempdir()?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "etcd-syncer e2e CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key)?;

        let (server_pem, server_key_pem) = leaf(&ca, &ca_key, "etcd-server", None)?;
        let (client_pem, client_key_pem) = leaf(&ca, &ca_key, "etcd-syncer", None)?;
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        Ok(Self {
            ca_cert: write("ca.pem", &ca.pem())?,
            server_cert: write("server.pem", &server_pem)?,
            server_key: write("server-key.pem", &server_key_pem)?,
            client_cert: write("client.pem", &client_pem)?,
            client_key: write("client-key.pem", &client_key_pem)?,
            ca: Arc::new((ca, ca_key)),
            _dir: Arc::new(dir),
        })
    }

    /// Replaces the client certificate and key in place with a new pair
    /// from the same CA, valid until `not_after_year`-01-01 (as a rotated
    /// Secret does: the key first, then the certificate).
    pub fn rotate_client(&self, not_after_year: i32) -> Result<()> {
        let (ca, ca_key) = &*self.ca;
        let (pem, key_pem) = leaf(ca, ca_key, "etcd-syncer", Some(not_after_year))?;
        std::fs::write(&self.client_key, key_pem)?;
        std::fs::write(&self.client_cert, pem)?;
        Ok(())
    }

    pub fn client_tls_options(&self) -> Result<TlsOptions> {
        Ok(TlsOptions::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&self.ca_cert)?))
            .identity(Identity::from_pem(
                std::fs::read(&self.client_cert)?,
                std::fs::read(&self.client_key)?,
            )))
    }

    /// Flags for one side of the syncer, e.g. `side = "src"`.
    pub fn syncer_args(&self, side: &str) -> Vec<String> {
        vec![
            format!("--{side}-cacert"),
            self.ca_cert.display().to_string(),
            format!("--{side}-cert"),
            self.client_cert.display().to_string(),
            format!("--{side}-key"),
            self.client_key.display().to_string(),
        ]
    }
}

/// A leaf certificate for 127.0.0.1/localhost, for servers and clients.
fn leaf(
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
    common_name: &str,
    not_after_year: Option<i32>,
) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse()?));
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    if let Some(year) = not_after_year {
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
    }
    let cert = params.signed_by(&key, ca, ca_key)?;
    Ok((cert.pem(), key.serialize_pem()))
}
