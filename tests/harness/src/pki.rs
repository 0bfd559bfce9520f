//! The certificates a test control plane needs: one CA, one serving certificate for every
//! component on 127.0.0.1, the admin client certificate (`system:masters`) and the
//! service-account signing key (ECDSA P-256, which kube-apiserver accepts as ES256).

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

/// Paths of the PEM files written for one control plane.
#[derive(Debug, Clone)]
pub struct Pki {
    /// CA certificate (also the client CA and the root CA handed to pods).
    pub ca_cert: PathBuf,
    /// CA key (the controller-manager signs CSRs with it).
    pub ca_key: PathBuf,
    /// Serving certificate for 127.0.0.1/localhost and the in-cluster `kubernetes` names.
    pub serving_cert: PathBuf,
    /// Its key.
    pub serving_key: PathBuf,
    /// Admin client certificate, `CN=admin, O=system:masters`.
    pub admin_cert: PathBuf,
    /// Its key.
    pub admin_key: PathBuf,
    /// Service-account signing key (PKCS#8).
    pub sa_key: PathBuf,
    /// Its public half.
    pub sa_pub: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| p.display().to_string())?;
    Ok(p)
}

impl Pki {
    /// Generates every certificate and key into `dir`.
    /// `address` is where the components listen (named in the serving certificate).
    pub fn generate(dir: &Path, service_ip: &str, address: &str) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "relayfed-test-cluster-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);

        let serving_key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(vec![
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
            "kubernetes.default.svc.cluster.local".to_owned(),
        ])?;
        serving.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse()?));
        serving.subject_alt_names.push(SanType::IpAddress(service_ip.parse()?));
        if address != "127.0.0.1" {
            serving.subject_alt_names.push(SanType::IpAddress(address.parse()?));
        }
        serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        let serving_cert = serving.signed_by(&serving_key, &issuer)?;

        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::default();
        admin.distinguished_name.push(DnType::CommonName, "admin");
        admin.distinguished_name.push(DnType::OrganizationName, "system:masters");
        let admin_cert = admin.signed_by(&admin_key, &issuer)?;

        let sa = KeyPair::generate()?;
        Ok(Self {
            ca_cert: write(dir, "ca.crt", &ca_cert.pem())?,
            ca_key: write(dir, "ca.key", &issuer.key().serialize_pem())?,
            serving_cert: write(dir, "serving.crt", &serving_cert.pem())?,
            serving_key: write(dir, "serving.key", &serving_key.serialize_pem())?,
            admin_cert: write(dir, "admin.crt", &admin_cert.pem())?,
            admin_key: write(dir, "admin.key", &admin_key.serialize_pem())?,
            sa_key: write(dir, "sa.key", &sa.serialize_pem())?,
            sa_pub: write(dir, "sa.pub", &sa.public_key_pem())?,
        })
    }
}
