//! The async frame reader (`transport::io::read_frame`) over a byte stream delivered in
//! chunks of arbitrary size: frames split across reads, truncated frames, trailing garbage.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::transport::io::read_frame;
use tokio::io::{AsyncRead, ReadBuf};

/// Yields the input at most `chunk` bytes per read (always ready).
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (head, rest) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let mut reader = Chunked { data: rest, chunk: usize::from(chunk).max(1) };
    let mut cx = Context::from_waker(Waker::noop());
    // Every read is ready at once, so each frame read completes in one poll.
    for _ in 0..1024 {
        let mut fut = std::pin::pin!(read_frame(&mut reader));
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(Some(frame))) => {
                let _ = frame.encode();
            }
            Poll::Ready(Ok(None) | Err(_)) => return,
            Poll::Pending => panic!("an always-ready reader left the frame reader pending"),
        }
    }
});
