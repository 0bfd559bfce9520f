//! The stream idle watchdog: both directions of a stream touch it when payload moves, and
//! [`IdleWatch::expired`] completes once nothing moved either way for the idle timeout; and
//! the relay's splice of two QUIC streams under it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::ErrorCode;

/// When a stream last carried payload, in either direction.
#[derive(Debug)]
pub struct IdleWatch {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last payload.
    last: AtomicU64,
}

impl Default for IdleWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl IdleWatch {
    /// A watch whose idle time starts now.
    pub fn new() -> Self {
        Self { epoch: Instant::now(), last: AtomicU64::new(0) }
    }

    /// Records payload moving now.
    pub fn touch(&self) {
        self.last.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Completes once no payload moved for `idle`.
    pub async fn expired(&self, idle: Duration) {
        loop {
            let since = self.epoch.elapsed().saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)));
            if since >= idle {
                return;
            }
            tokio::time::sleep(idle - since).await;
        }
    }
}

/// Forwards `from` to `to` until EOF or an error, touching `watch` for every chunk; at EOF it
/// finishes `to` (on an error the caller decides: a relay resets both streams). Chunks move as
/// quinn received them (`Bytes`, no copy, no buffer per stream: a relay holds many streams).
/// Returns the bytes forwarded and whether it ended cleanly (EOF read, everything written,
/// `to` finished).
pub async fn forward_watched(
    from: &mut quinn::RecvStream,
    to: &mut quinn::SendStream,
    watch: &IdleWatch,
) -> (u64, bool) {
    let mut total = 0u64;
    loop {
        match from.read_chunk(usize::MAX, true).await {
            Ok(None) => break,
            Err(_) => return (total, false),
            Ok(Some(chunk)) => {
                watch.touch();
                total += chunk.bytes.len() as u64;
                if to.write_chunk(chunk.bytes).await.is_err() {
                    return (total, false);
                }
            }
        }
    }
    (total, to.finish().is_ok())
}

/// Copies two QUIC streams into each other until the stream is over: `a` is the caller's
/// side, `b` the next hop's. Requests flow `a -> b`, answers `b -> a`. The stream is `Ok(bytes
/// copied)` once the answer direction has ended cleanly, whatever became of the request
/// direction (a far side that answers may stop reading, and its STOP can arrive before its
/// answer is read, so a request-side failure waits for the answer). It fails when the answer
/// direction fails, or after `idle` without payload either way; then every half still open
/// is reset or stopped (so neither end waits for the other) and the code used is returned
/// (`PEER_UNREACHABLE`, `TIMEOUT`).
pub async fn splice_streams(
    a: (&mut quinn::SendStream, &mut quinn::RecvStream),
    b: (&mut quinn::SendStream, &mut quinn::RecvStream),
    idle: Duration,
) -> Result<u64, ErrorCode> {
    let ((a_send, a_recv), (b_send, b_recv)) = (a, b);
    let watch = IdleWatch::new();
    let (mut requests, mut answers) = (None, None);
    let outcome = {
        let mut up = std::pin::pin!(forward_watched(a_recv, b_send, &watch));
        let mut down = std::pin::pin!(forward_watched(b_recv, a_send, &watch));
        let mut expired = std::pin::pin!(watch.expired(idle));
        loop {
            tokio::select! {
                r = &mut up, if requests.is_none() => requests = Some(r),
                r = &mut down, if answers.is_none() => answers = Some(r),
                () = &mut expired => break Err(ErrorCode::Timeout),
            }
            match (requests, answers) {
                (_, Some((_, false))) => break Err(ErrorCode::PeerUnreachable),
                (Some((m, _)), Some((n, true))) => break Ok(m + n),
                _ => {}
            }
        }
    };
    if let Err(code) = outcome {
        let reset = quinn::VarInt::from_u32(u32::from(code.to_u16()));
        if !matches!(requests, Some((_, true))) {
            let _ = b_send.reset(reset);
            let _ = a_recv.stop(reset);
        }
        let _ = a_send.reset(reset);
        let _ = b_recv.stop(reset);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_only_after_a_quiet_period() {
        let w = IdleWatch::new();
        let idle = Duration::from_secs(10);
        tokio::time::advance(Duration::from_secs(6)).await;
        w.touch();
        let started = tokio::time::Instant::now();
        w.expired(idle).await;
        // Paused time: the watch slept exactly until 10 s after the touch.
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }
}
