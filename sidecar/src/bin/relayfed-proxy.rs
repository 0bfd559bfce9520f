//! `relayfed-proxy`: the relayfed data-plane binary (main relay, home node, ECH tooling).

use std::path::PathBuf;

use anyhow::Context;
use clap::builder::TypedValueParser;
use clap::{Parser, Subcommand, ValueEnum};
use relayfed_sidecar::config::keys::EchKeyFile;
use relayfed_sidecar::config::{Role, Snapshot, base64_decode, base64_encode};
use relayfed_sidecar::crypto::ech::EchKeyPair;
use relayfed_sidecar::node::runner::{self, RunOptions};
use relayfed_sidecar::protocol::EchConfigList;
use relayfed_sidecar::protocol::ech_config::ListEntry;

#[derive(Parser)]
#[command(name = "relayfed-proxy", version, about = "relayfed data plane: main relay, home node, ECH tooling")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a main relay (hub) from a config snapshot.
    MainRelay {
        /// Config snapshot (YAML or JSON).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        sub: ConfigServerArgs,
    },
    /// Run a home node (spoke) from a config snapshot.
    Home {
        /// Config snapshot (YAML or JSON).
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        sub: ConfigServerArgs,
    },
    /// Run as the injected sidecar of a pod: obtain a workload certificate with the projected
    /// service-account token, fetch this pod's snapshot, run as a home node, renew.
    Workload(relayfed_sidecar::node::workload::WorkloadOptions),
    /// ECH key tooling.
    Ech {
        #[command(subcommand)]
        command: EchCommand,
    },
    /// Install the iptables interception rules for a pod (init container; needs NET_ADMIN).
    /// From a snapshot (`--config`), or from flags: every outbound TCP connection redirected
    /// (scope all), as the injected init container does before the pod's snapshot exists.
    Init {
        /// The home node's config snapshot (its `intercept` section and imports).
        #[arg(long, required_unless_present = "outbound_port")]
        config: Option<PathBuf>,
        /// Outbound listener port (without `--config`).
        #[arg(long, conflicts_with = "config", requires = "proxy_uid")]
        outbound_port: Option<u16>,
        /// Uid of the proxy, never redirected (without `--config`).
        #[arg(long, conflicts_with = "config")]
        proxy_uid: Option<u32>,
        /// Destination CIDR never redirected (repeatable; without `--config`).
        #[arg(long, conflicts_with = "config")]
        exclude_cidr: Vec<String>,
        /// Destination port never redirected (repeatable; without `--config`).
        #[arg(long, conflicts_with = "config")]
        exclude_port: Vec<u16>,
        /// Do not install ip6tables rules (without `--config`).
        #[arg(long, conflicts_with = "config")]
        no_ipv6: bool,
        /// Print the rules instead of installing them.
        #[arg(long)]
        dry_run: bool,
        /// Remove the rules instead of installing them.
        #[arg(long, conflicts_with = "dry_run")]
        cleanup: bool,
        /// Which iptables installs the rules: `nft` (iptables-nft), `legacy` (iptables-legacy)
        /// or `auto` (`iptables` as the image resolves it). Use the one the node's kube-proxy uses.
        #[arg(
            long,
            default_value_t = relayfed_sidecar::intercept::rules::Backend::Auto,
            value_parser = clap::builder::PossibleValuesParser::new(["auto", "nft", "legacy"])
                .try_map(|s| s.parse::<relayfed_sidecar::intercept::rules::Backend>()),
        )]
        iptables: relayfed_sidecar::intercept::rules::Backend,
    },
    /// Federation CA tooling (local mode and hosts outside Kubernetes).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Noise static key tooling.
    Noise {
        #[command(subcommand)]
        command: NoiseCommand,
    },
}

/// Live configuration: where to stream new snapshot versions from.
#[derive(clap::Args)]
struct ConfigServerArgs {
    /// Config distribution server (`host:port`, HTTPS with the node's certificate); the
    /// `--config` file is the first version, newer ones are applied live.
    #[arg(long)]
    config_server: Option<String>,
    /// Node id in the distribution server's certificate.
    #[arg(long, default_value = relayfed_sidecar::distribution::DEFAULT_SERVER_NODE)]
    config_server_node: String,
    /// Exit when the parent process dies (a supervisor such as `relayfed local up` runs this
    /// node; a killed supervisor must leave no relays behind).
    #[arg(long)]
    exit_with_parent: bool,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a federation CA: writes DIR/ca.pem and DIR/ca.key (mode 0600).
    Init {
        /// Trust domain.
        #[arg(long)]
        trust_domain: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Encrypt ca.key with the passphrase in this file.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Issue a node certificate: writes OUT/<node>.pem and OUT/<node>.key (mode 0600).
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Trust domain of the CA.
        #[arg(long)]
        trust_domain: String,
        /// Node id.
        #[arg(long)]
        node: String,
        /// Validity in hours.
        #[arg(long, default_value_t = 24 * 30)]
        hours: u64,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Passphrase of ca.key (if encrypted); also encrypts the issued key.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// A home's Noise key file (`noise keygen`): the certificate binds its public key, as
        /// main relays require of homes under a plan. Read with the same passphrase.
        #[arg(long)]
        noise_key: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum NoiseCommand {
    /// Generate a Noise static key: writes the private key (base64, mode 0600), prints the public key.
    Keygen {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
        /// Encrypt the key file with the passphrase in this file.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum EchCommand {
    /// Generate an ECH key: writes the private key file, prints the ECHConfigList (base64).
    Keygen {
        /// Public name written into the config.
        #[arg(long)]
        public_name: String,
        /// Config id (0-255).
        #[arg(long, default_value_t = 1)]
        config_id: u8,
        /// Where to write the key file (mode 0600).
        #[arg(long, default_value = "ech-key.json")]
        out: PathBuf,
        /// Encrypt the key file with the passphrase in this file.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Parse an ECHConfigList (base64) and print it as JSON, with skipped entries and why.
    Inspect {
        /// The ECHConfigList, base64.
        list: String,
    },
    /// Open a captured sealed route header (base64) with a key file and print the inner route.
    Open {
        /// Key file written by `ech keygen`.
        #[arg(long)]
        key: PathBuf,
        /// The route header (ROUTE frame payload), base64.
        #[arg(long)]
        route_header: String,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RELAYFED_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// glibc malloc arenas a node runs with unless `MALLOC_ARENA_MAX` says otherwise. With
/// glibc's default (8 per core) a relay that accepted 1,000 homes at once kept 222 KiB per
/// home, freed memory scattered over many arenas; with 2, 58 KiB (docs/benchmarks.md, scale).
const MALLOC_ARENAS: &str = "2";

/// Long-running nodes start again as themselves with `MALLOC_ARENA_MAX` set (glibc reads it
/// before `main`; `mallopt` would need unsafe code). Same process id, same arguments; when
/// the variable is already set, or the re-exec fails, the node runs as it is.
fn bound_malloc_arenas() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "relayfed-proxy".into());
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let err = std::process::Command::new(exe).arg0(arg0).args(args).env("MALLOC_ARENA_MAX", MALLOC_ARENAS).exec();
    // Only reached when exec failed (no /proc): logged once logging is up.
    eprintln!("relayfed-proxy: running with glibc's default malloc arenas: cannot re-exec: {err}");
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if matches!(cli.command, Command::MainRelay { .. } | Command::Home { .. }) {
        bound_malloc_arenas();
        relayfed_serving::listener::raise_fd_limit();
    }
    init_logging(cli.log_format);
    match cli.command {
        Command::Ech { command } => ech(command),
        Command::MainRelay { config, sub } => run(config, Role::Main, sub),
        Command::Home { config, sub } => run(config, Role::Home, sub),
        Command::Init {
            config,
            outbound_port,
            proxy_uid,
            exclude_cidr,
            exclude_port,
            no_ipv6,
            dry_run,
            cleanup,
            iptables,
        } => {
            let (ic, imports, source) = match (config, outbound_port, proxy_uid) {
                (Some(config), _, _) => {
                    let snap = Snapshot::load(&config)?;
                    let ic = snap
                        .intercept
                        .clone()
                        .with_context(|| format!("{}: no `intercept` section: nothing to install", config.display()))?;
                    (ic, snap.imports, config.display().to_string())
                }
                (None, Some(outbound_port), Some(proxy_uid)) => {
                    let ic = relayfed_sidecar::config::Intercept {
                        outbound_port,
                        proxy_uid,
                        scope: relayfed_sidecar::config::InterceptScope::All,
                        exclude_cidrs: exclude_cidr,
                        exclude_ports: exclude_port,
                        unmatched: relayfed_sidecar::config::Unmatched::Passthrough,
                        ipv6: !no_ipv6,
                    };
                    (ic, vec![], "flags".to_owned())
                }
                _ => anyhow::bail!("give --config, or --outbound-port with --proxy-uid"),
            };
            init(&ic, &imports, &source, InitMode { dry_run, cleanup, backend: iptables })
        }
        Command::Workload(opts) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(relayfed_sidecar::node::workload::run(opts))
        }
        Command::Ca { command } => ca(command),
        Command::Noise { command: NoiseCommand::Keygen { out, passphrase_file } } => {
            let key = relayfed_sidecar::crypto::noise::StaticKeypair::generate()?;
            relayfed_sidecar::config::keys::save_noise_key(&out, &key, read_passphrase(passphrase_file)?.as_deref())?;
            println!("{}", base64_encode(&key.public));
            Ok(())
        }
    }
}

/// Reads a passphrase file (trailing newline removed).
fn read_passphrase(path: Option<PathBuf>) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(path) = path else { return Ok(None) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("passphrase file {}", path.display()))?;
    Ok(Some(text.trim_end_matches(['\n', '\r']).as_bytes().to_vec()))
}

/// What `relayfed-proxy init` does with the rules.
struct InitMode {
    dry_run: bool,
    cleanup: bool,
    backend: relayfed_sidecar::intercept::rules::Backend,
}

fn init(
    ic: &relayfed_sidecar::config::Intercept,
    imports: &[relayfed_sidecar::config::Import],
    source: &str,
    InitMode { dry_run, cleanup, backend }: InitMode,
) -> anyhow::Result<()> {
    use relayfed_sidecar::intercept::rules;
    for (i, c) in ic.exclude_cidrs.iter().enumerate() {
        anyhow::ensure!(rules::parse_cidr(c).is_some(), "{source}: exclude CIDR #{i} {c:?} is not an IP/prefix");
    }
    if dry_run {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for line in rules::dry_run(ic, imports, backend) {
            // A reader that stops early (`| head`) is not an error.
            if writeln!(out, "{line}").is_err() {
                break;
            }
        }
        return Ok(());
    }
    if cleanup {
        rules::cleanup(ic, backend)?;
        eprintln!("removed the relayfed interception rules");
    } else {
        rules::apply(ic, imports, backend)?;
        eprintln!(
            "installed the relayfed interception rules: outbound TCP -> port {} (uid {} excluded)",
            ic.outbound_port, ic.proxy_uid
        );
    }
    Ok(())
}

fn ca(command: CaCommand) -> anyhow::Result<()> {
    use relayfed_sidecar::config::keys::{read_secret, write_secret};
    use relayfed_sidecar::crypto::ca::FederationCa;
    match command {
        CaCommand::Init { trust_domain, out, passphrase_file } => {
            let pass = read_passphrase(passphrase_file)?;
            std::fs::create_dir_all(&out)?;
            let ca = FederationCa::generate(&trust_domain)?;
            std::fs::write(out.join("ca.pem"), &ca.certified_key().cert_pem)?;
            write_secret(&out.join("ca.key"), ca.certified_key().key_pem.as_bytes(), pass.as_deref())?;
            eprintln!("wrote {0}/ca.pem and {0}/ca.key", out.display());
        }
        CaCommand::Issue { ca_dir, trust_domain, node, hours, out, passphrase_file, noise_key } => {
            let pass = read_passphrase(passphrase_file)?;
            let cert_pem = std::fs::read_to_string(ca_dir.join("ca.pem"))
                .with_context(|| format!("{}/ca.pem", ca_dir.display()))?;
            let key_pem = String::from_utf8(read_secret(&ca_dir.join("ca.key"), pass.as_deref())?)?;
            let ca = FederationCa::from_pem(&trust_domain, &cert_pem, &key_pem)?;
            let bound = match &noise_key {
                Some(p) => Some(relayfed_sidecar::config::keys::load_noise_key(p, pass.as_deref())?.public),
                None => None,
            };
            let cert = ca.issue_bound(&node, std::time::Duration::from_secs(hours * 3600), bound.as_ref())?;
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join(format!("{node}.pem")), &cert.cert_pem)?;
            write_secret(&out.join(format!("{node}.key")), cert.key_pem.as_bytes(), pass.as_deref())?;
            eprintln!("wrote {0}/{node}.pem and {0}/{node}.key", out.display());
        }
    }
    Ok(())
}

fn run(config: PathBuf, role: Role, sub: ConfigServerArgs) -> anyhow::Result<()> {
    // Validate before binding anything.
    let snap = Snapshot::load(&config)?;
    if snap.node.role != role {
        anyhow::bail!(
            "{}: node.role is {:?}, but this command runs a {:?} node",
            config.display(),
            snap.node.role,
            role
        );
    }
    if sub.exit_with_parent {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
        if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
            anyhow::bail!("--exit-with-parent: the parent is already gone");
        }
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let opts = RunOptions {
        config_server: sub.config_server,
        config_server_node: sub.config_server_node,
        ..Default::default()
    };
    rt.block_on(runner::run(snap, opts))
}

fn ech(command: EchCommand) -> anyhow::Result<()> {
    match command {
        EchCommand::Keygen { public_name, config_id, out, passphrase_file } => {
            let key = EchKeyPair::generate(config_id, &public_name)?;
            EchKeyFile::from_key(&key).save(&out, read_passphrase(passphrase_file)?.as_deref())?;
            let list = EchConfigList { entries: vec![ListEntry::Config(key.config().clone())] }.encode()?;
            eprintln!("wrote private key to {} (mode 0600)", out.display());
            println!("{}", base64_encode(&list));
            Ok(())
        }
        EchCommand::Open { key, route_header } => {
            use relayfed_sidecar::protocol::{RouteBody, RouteHeader};
            let bytes = base64_decode(&route_header).context("the route header must be base64")?;
            let header = RouteHeader::decode(&bytes).context("not a valid route header")?;
            let RouteBody::Sealed(sealed) = header.body else { anyhow::bail!("the route header is not sealed") };
            let keys = EchKeyFile::load(&key, None)?.key_set(&key, std::time::Duration::from_secs(u64::MAX / 4))?;
            let route = keys
                .open(&sealed, std::time::SystemTime::now())
                .map_err(|e| anyhow::anyhow!("{} ({})", e, e.code()))?;
            println!(
                "{}",
                serde_json::json!({
                    "configId": sealed.config_id, "main": sealed.main, "destNode": route.dest_node,
                    "destMain": route.dest_main, "service": route.service, "port": route.port, "origin": route.origin,
                })
            );
            Ok(())
        }
        EchCommand::Inspect { list } => {
            let bytes = base64_decode(&list).context("the ECHConfigList must be base64")?;
            let parsed = EchConfigList::decode(&bytes).context("not a valid ECHConfigList")?;
            let configs: Vec<_> = parsed
                .configs()
                .map(|c| {
                    serde_json::json!({
                        "configId": c.config_id,
                        "kemId": format!("0x{:04x}", c.kem_id),
                        "publicKey": c.public_key.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                        "cipherSuites": c.cipher_suites.iter().map(|s| serde_json::json!({
                            "kdfId": format!("0x{:04x}", s.kdf_id), "aeadId": format!("0x{:04x}", s.aead_id)
                        })).collect::<Vec<_>>(),
                        "maximumNameLength": c.maximum_name_length,
                        "publicName": c.public_name,
                        "extensions": c.extensions.iter().map(|e| format!("0x{:04x}", e.ext_type)).collect::<Vec<_>>(),
                        "usableByRelayfed": c.usable_suite().is_some(),
                    })
                })
                .collect();
            let skipped: Vec<_> = parsed
                .skipped()
                .map(|s| serde_json::json!({"index": s.index, "version": format!("0x{:04x}", s.version), "reason": s.reason}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({"configs": configs, "skipped": skipped}))?);
            Ok(())
        }
    }
}
