//! Reading and writing frames on QUIC streams, and copying between streams and sockets.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::frame::{FRAME_HEADER, Frame};
use crate::protocol::{DecodeError, ErrorCode, ErrorFrame};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    /// The stream failed or ended mid-frame.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes were not a valid frame.
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
}

/// Reads one frame; `Ok(None)` on a clean end of stream before any byte of a frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameIoError> {
    let mut head = [0u8; FRAME_HEADER];
    let mut got = 0;
    while got < FRAME_HEADER {
        let n = r.read(&mut head[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "stream ended inside a frame header").into()
            );
        }
        got += n;
    }
    let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame::decode_body(head[0], &payload)?))
}

/// Writes frames in one write call.
pub async fn write_frames<W: AsyncWrite + Unpin>(w: &mut W, frames: &[Frame]) -> Result<(), FrameIoError> {
    let mut buf = Vec::new();
    for f in frames {
        buf.extend_from_slice(&f.encode()?);
    }
    w.write_all(&buf).await?;
    Ok(())
}

/// Sends an ERROR frame (best effort: the stream is failing anyway).
pub async fn send_error<W: AsyncWrite + Unpin>(w: &mut W, code: ErrorCode, message: impl Into<String>) {
    let frame = Frame::Error(ErrorFrame { code, retry_after_ms: 0, message: message.into() });
    let _ = write_frames(w, &[frame]).await;
}

/// Sends an ERROR frame telling the sender to retry after `wait` (at least 1 ms; best
/// effort, as [`send_error`]).
pub async fn send_error_retry_after<W: AsyncWrite + Unpin>(
    w: &mut W,
    code: ErrorCode,
    wait: std::time::Duration,
    message: impl Into<String>,
) {
    let retry_after_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1);
    let frame = Frame::Error(ErrorFrame { code, retry_after_ms, message: message.into() });
    let _ = write_frames(w, &[frame]).await;
}

/// Listen backlog for application-facing TCP listeners: a burst of connections (a client
/// opening hundreds at once) must queue, not overflow into SYN retransmits (1 s stalls).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a TCP listener with [`LISTEN_BACKLOG`] (capped by the kernel's `somaxconn`).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
