//! Carrying bytes: a TCP socket on one side, Noise transport messages in NOISE frames on the
//! other, with the stream idle watchdog.

use super::*;

/// The first read from an app's connection; a sender that fills it gets larger reads, up to
/// a whole Noise message.
const FIRST_READ: usize = 16 * 1024;

/// A NOISE frame carrying `plain` encrypted, built in one buffer that quinn then sends as is.
fn noise_frame(tx: &mut SendHalf, plain: &[u8]) -> Option<bytes::Bytes> {
    use crate::protocol::frame::{FRAME_HEADER, kind};
    let mut frame = vec![0u8; FRAME_HEADER + plain.len() + 16];
    let len = tx.encrypt_into(plain, &mut frame[FRAME_HEADER..]).ok()?;
    let wire = u16::try_from(len).ok()?.to_be_bytes();
    frame[..FRAME_HEADER].copy_from_slice(&[kind::NOISE, wire[0], wire[1]]);
    frame.truncate(FRAME_HEADER + len);
    Some(frame.into())
}

impl HomeNode {
    /// Carries bytes between a TCP socket and a stream of Noise transport messages; says how
    /// the stream ended.
    pub(super) async fn pump(
        &self,
        tcp: TcpStream,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        (mut tx, mut rx): (SendHalf, RecvHalf),
        direction: &'static str,
        idle: Duration,
    ) -> Result<(), ErrorCode> {
        let _ = tcp.set_nodelay(true);
        let (tr, mut tw) = tcp.into_split();
        let watch = crate::transport::idle::IdleWatch::new();
        let touch = || watch.touch();
        let up = async {
            let mut total = 0u64;
            let mut read_size = FIRST_READ;
            loop {
                // No buffer is held while the app is quiet: an idle connection costs none.
                if tr.readable().await.is_err() {
                    break;
                }
                let mut plain = Vec::with_capacity(read_size);
                let n = match tr.try_read_buf(&mut plain) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => break,
                };
                touch();
                if n == read_size {
                    // A bulk sender: read up to a whole Noise message at a time.
                    read_size = (read_size * 2).min(MAX_PLAINTEXT);
                }
                let Some(frame) = noise_frame(&mut tx, &plain) else { return Err(ErrorCode::Internal) };
                if send.write_chunk(frame).await.is_err() {
                    return Err(ErrorCode::PeerUnreachable);
                }
                total += n as u64;
            }
            let _ = send.finish();
            Ok(total)
        };
        let down = async {
            let mut total = 0u64;
            loop {
                match read_frame(&mut recv).await {
                    Ok(Some(Frame::Noise(m))) => {
                        touch();
                        let Ok(pt) = rx.decrypt(&m) else { return Err(ErrorCode::HandshakeFailed) };
                        if tw.write_all(&pt).await.is_err() {
                            return Err(ErrorCode::TargetUnreachable);
                        }
                        total += pt.len() as u64;
                    }
                    Ok(Some(Frame::Error(e))) => return Err(e.code),
                    Ok(Some(_)) => return Err(ErrorCode::MalformedFrame),
                    Ok(None) => break,
                    Err(_) => return Err(ErrorCode::PeerUnreachable),
                }
            }
            let _ = tw.shutdown().await;
            Ok(total)
        };
        let watchdog = watch.expired(idle);
        // A failure on the QUIC side (the relay reset the stream, the far side is gone) ends
        // the stream at once; a failure on the app's side waits for the QUIC side to end, so
        // an answer already on its way is still delivered. Idleness ends it too.
        let (mut up, mut down) = (std::pin::pin!(up), std::pin::pin!(down));
        let mut watchdog = std::pin::pin!(watchdog);
        let (mut u, mut d) = (None, None);
        loop {
            tokio::select! {
                r = &mut up, if u.is_none() => u = Some(r),
                r = &mut down, if d.is_none() => d = Some(r),
                () = &mut watchdog => {
                    warn!(code = ErrorCode::Timeout.label(), idle_ms = idle.as_millis() as u64, "stream idle: closed");
                    self.metrics.proxy_stream_error(ErrorCode::Timeout);
                    return Err(ErrorCode::Timeout);
                }
            }
            if matches!(d, Some(Err(_))) || (u.is_some() && d.is_some()) {
                break;
            }
        }
        let result = match (u, d) {
            (_, Some(Err(code))) | (Some(Err(code)), _) => Err(code),
            (Some(Ok(u)), Some(Ok(d))) => Ok((u, d)),
            _ => Err(ErrorCode::Internal),
        };
        let (tx_dir, rx_dir) = if direction == "outbound" { ("tx", "rx") } else { ("rx", "tx") };
        match result {
            Ok((u, d)) => {
                self.metrics.proxy.bytes.get_or_create(&[("direction", tx_dir)]).inc_by(u);
                self.metrics.proxy.bytes.get_or_create(&[("direction", rx_dir)]).inc_by(d);
                Ok(())
            }
            Err(code) => {
                warn!(code = code.label(), "stream aborted");
                self.metrics.proxy_stream_error(code);
                Err(code)
            }
        }
    }
}
