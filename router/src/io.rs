//! Connection plumbing: reading a PROXY header off a fresh connection, and
//! giving back the bytes read past it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::proxy_protocol::{self, Parsed, ProxyHeader, ProxyProtocolError};

/// A stream with some already-read bytes put back in front.
#[derive(Debug)]
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(inner: T, prefix: Bytes) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = buf.remaining().min(this.prefix.len());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

/// `AsyncWrite` for a read-side wrapper `$ty<T>` with an `inner: T`
/// field: every write call goes straight to `inner`.
macro_rules! delegate_async_write {
    ($ty:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<T> {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use delegate_async_write;

delegate_async_write!(Prefixed);

/// Why a PROXY header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadProxyError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Protocol(#[from] ProxyProtocolError),
    #[error("connection closed before the PROXY header ended")]
    Eof,
}

/// Read a PROXY v1/v2 header from the start of `stream`. Returns the header
/// and whatever was read past it (the start of the HTTP or TLS stream).
/// The caller bounds the time this may take.
pub async fn read_proxy_header<T: AsyncRead + Unpin>(
    stream: &mut T,
) -> Result<(ProxyHeader, Bytes), ReadProxyError> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(ReadProxyError::Eof);
        }
        match proxy_protocol::parse(&buf)? {
            Parsed::Complete(h, len) => {
                let rest = buf.split_off(len).freeze();
                return Ok((h, rest));
            }
            Parsed::Incomplete => {
                // parse() refuses over-long headers, so this only bounds a
                // peer that sends bytes parse() cannot judge yet.
                if buf.len() > proxy_protocol::V2_MAX {
                    return Err(ProxyProtocolError::TooLong.into());
                }
            }
        }
    }
}

/// A client stream whose writes must make progress: once a write (or
/// flush) has been waiting on the peer for `timeout` (a client that stopped
/// reading, its window full), every write fails with `TimedOut`, which ends
/// the connection and drops whatever answer was being sent, freeing its
/// backend connection. Reads pass through.
///
/// The timer is armed only while a write is blocked, and re-armed by any
/// progress, so a slow but steady reader is never cut off.
#[derive(Debug)]
pub struct SendTimeout<T> {
    inner: T,
    timeout: std::time::Duration,
    /// Allocated on the first blocked write; `armed` says whether it runs.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl<T> SendTimeout<T> {
    pub fn new(inner: T, timeout: std::time::Duration) -> Self {
        SendTimeout {
            inner,
            timeout,
            deadline: None,
            armed: false,
        }
    }

    /// What the inner write said, with the clock applied: progress
    /// disarms it, being blocked arms it (once) and fails once it expires.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        let at = tokio::time::Instant::now() + self.timeout;
        let sleep = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if !self.armed {
            sleep.as_mut().reset(at);
            self.armed = true;
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client took nothing for the send timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SendTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for SendTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, polled)
    }
}
