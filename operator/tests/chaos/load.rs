//! Steady load through the callers' import listeners, and what became of every call.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What became of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The payload came back whole.
    Ok,
    /// The connection failed, was reset, or timed out.
    Failed,
    /// Bytes came back that were not the payload: never acceptable.
    WrongData,
}

/// One call: when it started (from the load's start), through which caller, how long it
/// took and what became of it.
#[derive(Clone, Debug)]
pub struct Call {
    /// Start, from the start of the load.
    pub at: Duration,
    /// The caller's index.
    pub caller: usize,
    /// Time until the outcome.
    pub took: Duration,
    /// The outcome.
    pub outcome: Outcome,
}

/// Calls made so far.
pub type Calls = Arc<Mutex<Vec<Call>>>;

/// Longest a call may take before it counts as failed (the default call timeout is 15 s).
const CALL_LIMIT: Duration = Duration::from_secs(20);

/// Starts `rate` calls per second over `callers` (in turn) until `stop` is set; each call
/// writes a unique payload of `bytes`, half-closes, and reads everything back.
pub fn start(
    callers: Vec<SocketAddr>,
    rate: u32,
    bytes: usize,
    started: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Calls, tokio::task::JoinHandle<()>) {
    let calls: Calls = Arc::default();
    let out = calls.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut inflight = tokio::task::JoinSet::new();
        let mut n: u64 = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tick.tick().await;
            let caller = (n % callers.len() as u64) as usize;
            let addr = callers[caller];
            let payload = payload(n, bytes);
            let calls = calls.clone();
            inflight.spawn(async move {
                let at = started.elapsed();
                let t0 = Instant::now();
                let outcome = match tokio::time::timeout(CALL_LIMIT, call(addr, &payload)).await {
                    Ok(Ok(back)) if back == payload => Outcome::Ok,
                    Ok(Ok(back)) if back.is_empty() => Outcome::Failed,
                    Ok(Ok(_)) => Outcome::WrongData,
                    _ => Outcome::Failed,
                };
                if let Ok(mut c) = calls.lock() {
                    c.push(Call { at, caller, took: t0.elapsed(), outcome });
                }
            });
            n += 1;
            while inflight.try_join_next().is_some() {}
        }
        while inflight.join_next().await.is_some() {}
    });
    (out, task)
}

/// A payload unique to call `n`: its number, then a pattern.
fn payload(n: u64, bytes: usize) -> Vec<u8> {
    let mut p = n.to_be_bytes().to_vec();
    p.extend((0..bytes.saturating_sub(8)).map(|i| (i as u64 ^ n) as u8));
    p
}

async fn call(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(payload).await?;
        w.shutdown().await
    };
    let mut back = Vec::with_capacity(payload.len());
    let (wr, rd) = tokio::join!(write, r.read_to_end(&mut back));
    wr?;
    rd?;
    Ok(back)
}
