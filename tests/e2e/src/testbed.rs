//! A fake CA and config snapshots for a topology, written to a temporary directory, so tests
//! run the real `relayfed-proxy` from the same files local mode uses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use relayfed_proto::config::keys::{EchKeyFile, save_noise_key};
use relayfed_proto::config::{
    EchServerConfig, Export, Import, MainRelay, NodeConfig, Role, Snapshot, Timeouts, TlsFiles, base64_encode,
};
use relayfed_proto::crypto::ca::FederationCa;
use relayfed_proto::crypto::ech::EchKeyPair;
use relayfed_proto::crypto::noise::StaticKeypair;
use relayfed_proto::federation::ech_policy::EchPolicy;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The link idle timeout of test snapshots (see [`Testbed`]'s base snapshot).
pub const TEST_LINK_IDLE_MS: u64 = 5_000;

/// A directory with a federation CA and per-node key material.
pub struct Testbed {
    /// The directory (removed on drop).
    pub dir: PathBuf,
    /// The CA.
    pub ca: FederationCa,
    /// Trust domain.
    pub trust_domain: String,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text)?;
    Ok(())
}

impl Testbed {
    /// A fresh testbed for `trust_domain`.
    pub fn new(trust_domain: &str) -> anyhow::Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("relayfed-testbed-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ca = FederationCa::generate(trust_domain)?;
        write(&dir.join("ca.pem"), &ca.certified_key().cert_pem)?;
        Ok(Self { dir, ca, trust_domain: trust_domain.to_owned() })
    }

    /// Issues a certificate for `node` and returns the TLS file set.
    pub fn tls_for(&self, node: &str) -> anyhow::Result<TlsFiles> {
        self.tls_bound(node, None)
    }

    /// Issues a certificate for `node`, binding `noise_key` when given (as home certificates
    /// are), and returns the TLS file set.
    pub fn tls_bound(&self, node: &str, noise_key: Option<&[u8; 32]>) -> anyhow::Result<TlsFiles> {
        let cert = self.ca.issue_bound(node, Duration::from_secs(3600), noise_key)?;
        let (c, k) = (self.dir.join(format!("{node}.pem")), self.dir.join(format!("{node}.key")));
        write(&c, &cert.cert_pem)?;
        relayfed_proto::config::keys::write_private(&k, cert.key_pem.as_bytes())?;
        Ok(TlsFiles { ca_file: self.dir.join("ca.pem"), cert_file: c, key_file: k })
    }

    /// A snapshot with a certificate for `node` (binding `noise_key`, as homes' do).
    fn base(&self, node: &str, role: Role, noise_key: Option<&[u8; 32]>) -> anyhow::Result<Snapshot> {
        Ok(Snapshot {
            schema: relayfed_proto::config::SNAPSHOT_SCHEMA,
            version: 1,
            node: NodeConfig { id: node.to_owned(), role, trust_domain: self.trust_domain.clone() },
            tls: self.tls_bound(node, noise_key)?,
            listen: None,
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            ech: None,
            main_relays: vec![],
            noise_key_file: None,
            exports: vec![],
            imports: vec![],
            ech_policy: EchPolicy::default(),
            ech_configs: Default::default(),
            ech_announcement: None,
            intercept: None,
            peers: vec![],
            partners: vec![],
            registry: Default::default(),
            health_check_seconds: 30,
            load_balancing: Default::default(),
            trust: Default::default(),
            resilience: Default::default(),
            key_passphrase_file: None,
            // Debug builds doing hundreds of Noise and HPKE handshakes at once on two cores
            // can starve a process's QUIC driver for over a second: links in these tests get
            // 5 s before they are declared dead (failover tests set their own).
            timeouts: Timeouts { idle_ms: TEST_LINK_IDLE_MS, ..Timeouts::default() },
            direct_paths: Default::default(),
        })
    }

    /// A main relay snapshot with an ECH key of `config_id`; returns the snapshot path.
    pub fn main_relay(&self, node: &str, config_id: u8) -> anyhow::Result<PathBuf> {
        let mut s = self.base(node, Role::Main, None)?;
        s.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        let key = EchKeyPair::generate(config_id, "relay.test.example")?;
        let key_file = self.dir.join(format!("{node}-ech.json"));
        EchKeyFile::from_key(&key).save(&key_file, None)?;
        s.ech = Some(EchServerConfig { key_file, grace_seconds: 3600 });
        self.save(node, &s)
    }

    /// A main relay snapshot without ECH keys (it cannot open sealed routes).
    pub fn main_relay_without_ech(&self, node: &str) -> anyhow::Result<PathBuf> {
        let mut s = self.base(node, Role::Main, None)?;
        s.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        self.save(node, &s)
    }

    /// Creates (or reuses) the Noise key of `node`; returns its public key, base64.
    pub fn noise_key(&self, node: &str) -> anyhow::Result<String> {
        let path = self.dir.join(format!("{node}-noise.key"));
        let key = if path.exists() {
            relayfed_proto::config::keys::load_noise_key(&path, None)?
        } else {
            let k = StaticKeypair::generate()?;
            save_noise_key(&path, &k, None)?;
            k
        };
        Ok(base64_encode(&key.public))
    }

    /// The ECHConfigList (base64) of every main relay with an ECH key in this testbed, by
    /// node id: what the plan gives home snapshots as `echConfigs`.
    pub fn ech_configs(&self) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        let mut out = std::collections::BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(node) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix("-ech.json")) else {
                continue;
            };
            let list = EchKeyFile::load(&path, None)?.key_set(&path, Duration::ZERO)?.config_list()?;
            out.insert(node.to_owned(), base64_encode(&list));
        }
        Ok(out)
    }

    /// A home node snapshot (with the ECH configs of every main relay created so far);
    /// returns its path.
    pub fn home(
        &self,
        node: &str,
        main: MainRelay,
        exports: Vec<Export>,
        imports: Vec<Import>,
        policy: EchPolicy,
    ) -> anyhow::Result<PathBuf> {
        let public = relayfed_proto::config::decode_key32(&self.noise_key(node)?)
            .ok_or_else(|| anyhow::anyhow!("noise key of {node} is not 32 bytes"))?;
        let mut s = self.base(node, Role::Home, Some(&public))?;
        s.noise_key_file = Some(self.dir.join(format!("{node}-noise.key")));
        s.main_relays = vec![main];
        s.exports = exports;
        s.imports = imports;
        s.ech_policy = policy;
        s.ech_configs = self.ech_configs()?;
        self.save(node, &s)
    }

    /// Re-writes `node`'s TLS key and Noise key (if any) sealed with `passphrase`, and points
    /// its snapshot at a passphrase file; returns the passphrase file.
    pub fn encrypt_keys(&self, node: &str, passphrase: &str) -> anyhow::Result<PathBuf> {
        let snap_path = self.dir.join(format!("{node}.yaml"));
        let mut s = Snapshot::load(&snap_path)?;
        let pass_file = self.dir.join(format!("{node}.passphrase"));
        relayfed_proto::config::keys::write_private(&pass_file, format!("{passphrase}\n").as_bytes())?;
        for key in std::iter::once(s.tls.key_file.clone()).chain(s.noise_key_file.clone()) {
            let plain = std::fs::read(&key)?;
            relayfed_proto::config::keys::write_secret(&key, &plain, Some(passphrase.as_bytes()))?;
        }
        s.key_passphrase_file = Some(pass_file.clone());
        self.save(node, &s)?;
        Ok(pass_file)
    }

    /// Writes a snapshot as YAML.
    pub fn save(&self, node: &str, s: &Snapshot) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("{node}.yaml"));
        write(&path, &serde_saphyr::to_string(s)?)?;
        Ok(path)
    }
}
