//! Connection plumbing: reading a PROXY header off a fresh connection, and
//! giving back the bytes read past it.

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
