//! Process metrics under their standard names (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`), read from
//! `/proc/self` on each scrape, and `relayfed_build_info`. Linux only; elsewhere the process
//! series are absent.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Linux reports `/proc/<pid>/stat` times in USER_HZ, which is 100 on every architecture.
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (user + system) from the text of `/proc/self/stat`.
pub fn cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may contain spaces: fields after it
    // start after the last ')'. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// Resident memory in bytes from the text of `/proc/self/status` (`VmRSS: N kB`).
pub fn resident_bytes(status: &str) -> Option<i64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The soft limit on open files from the text of `/proc/self/limits`.
pub fn max_fds(limits: &str) -> Option<i64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// Reads the process metrics on each scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        if let Some(cpu) = read("/proc/self/stat").as_deref().and_then(cpu_seconds) {
            let c = ConstCounter::new(cpu);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                read("/proc/self/status").as_deref().and_then(resident_bytes),
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as i64),
            ),
            (
                "process_max_fds",
                "Limit on open file descriptors",
                read("/proc/self/limits").as_deref().and_then(max_fds),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// Registers the process metrics and `relayfed_build_info{version}` in `registry`.
pub fn register(registry: &mut prometheus_client::registry::Registry) {
    registry.register_collector(Box::new(ProcessCollector));
    registry.register(
        "relayfed_build",
        "The relayfed version this process runs",
        prometheus_client::metrics::info::Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn proc_files_are_read_as_linux_writes_them() {
        let stat = "4242 (relay (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 9 0 123 0 0";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(resident_bytes("Name:\trelayfed\nVmRSS:\t   5120 kB\n"), Some(5120 * 1024));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(max_fds(limits), Some(1024));
        assert_eq!(cpu_seconds("no parenthesis"), None);
        assert_eq!(resident_bytes("VmRSS: lots"), None);
    }

    #[test]
    fn this_process_is_measured() {
        let mut registry = prometheus_client::registry::Registry::default();
        register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        for name in ["process_cpu_seconds_total ", "process_resident_memory_bytes ", "process_open_fds "] {
            assert!(out.contains(name), "{name} missing: {out}");
        }
        assert!(out.contains(&format!("relayfed_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))), "{out}");
    }

    proptest! {
        /// Whatever the files hold, parsing never panics.
        #[test]
        fn arbitrary_proc_text_never_panics(text in ".{0,300}") {
            let _ = (cpu_seconds(&text), resident_bytes(&text), max_fds(&text));
        }
    }
}
