//! Bodies between client and backend.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use http_body_util::{Either, Empty, Full, Limited};
use hyper::body::Incoming;

use crate::error::{ErrorKind, ProxyError};

/// Body sent to a backend: the client's (with the size limit), or empty for
/// requests without one (so that they can be sent again on retry).
pub type ReqBody = Either<ClientBody<Limited<Incoming>>, Empty<Bytes>>;

/// The client's side of a request body failed: what the send error cannot
/// say (over HTTP/2 the cause does not survive in it), noted by the body.
#[derive(Debug, Default)]
pub struct BodyFault(std::sync::atomic::AtomicU8);

impl BodyFault {
    const NONE: u8 = 0;
    const OVER_LIMIT: u8 = 1;
    const BROKEN: u8 = 2;

    /// The error to answer with when sending failed because of the
    /// client's body: 413 over the limit, 400 for a body that broke (bad
    /// chunked framing, the client gone mid-upload). Neither is the
    /// backend's fault.
    pub(crate) fn error(&self) -> Option<ProxyError> {
        match self.0.load(Relaxed) {
            Self::OVER_LIMIT => Some(ProxyError::new(ErrorKind::BodyTooLarge)),
            Self::BROKEN => Some(ProxyError::new(ErrorKind::ClientBody)),
            _ => None,
        }
    }
}

/// The client's request body as sent to a backend, noting in a
/// [`BodyFault`] when it fails.
pub struct ClientBody<B> {
    inner: B,
    fault: Arc<BodyFault>,
}

impl<B> ClientBody<B> {
    /// `inner`, noting its failure in `fault`.
    pub fn new(inner: B, fault: Arc<BodyFault>) -> Self {
        ClientBody { inner, fault }
    }
}

impl<B> hyper::body::Body for ClientBody<B>
where
    B: hyper::body::Body<Error = Box<dyn std::error::Error + Send + Sync>> + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(e))) = &polled {
            let fault = if e.is::<http_body_util::LengthLimitError>() {
                BodyFault::OVER_LIMIT
            } else {
                BodyFault::BROKEN
            };
            // The first fault is the cause.
            let _ = self
                .fault
                .0
                .compare_exchange(BodyFault::NONE, fault, Relaxed, Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Body sent to a client: the backend's, or one the router made.
pub type RespBody = Either<Incoming, Full<Bytes>>;
