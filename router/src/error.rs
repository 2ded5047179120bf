//! Proxy errors, classified by fault and by whether a retry is safe, and
//! mapped to a status code in exactly one place: [`ProxyError::status`].

use std::fmt;

use http::StatusCode;

/// Who is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client sent something the router will not forward.
    Downstream,
    /// The backend could not be reached, or failed, or was too slow.
    Upstream,
    /// The router has nowhere to send the request.
    Internal,
}

impl ErrorSource {
    /// Every source, in the order of [`ErrorSource::index`].
    pub const ALL: [ErrorSource; 3] = [
        ErrorSource::Downstream,
        ErrorSource::Upstream,
        ErrorSource::Internal,
    ];

    /// The name in metrics and the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Downstream => "client",
            ErrorSource::Upstream => "backend",
            ErrorSource::Internal => "router",
        }
    }

    pub fn index(self) -> usize {
        match self {
            ErrorSource::Downstream => 0,
            ErrorSource::Upstream => 1,
            ErrorSource::Internal => 2,
        }
    }
}

/// Whether the request may go to another backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryType {
    /// Nothing of the request reached a backend (connect failed): an
    /// idempotent request with no body may be retried elsewhere.
    Safe,
    /// The backend may have seen the request but not answered: retry only
    /// a request that is idempotent by its method.
    IdempotentOnly,
    /// The backend may have acted on the request.
    Unsafe,
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No route for this host and path.
    NoRoute,
    /// A route, but no backend that may take requests.
    NoBackend,
    /// TCP connect or HTTP/2 handshake to the backend failed or timed out.
    Connect,
    /// The backend did not answer with headers within the upstream timeout.
    UpstreamTimeout,
    /// The backend closed the connection before answering (typically a
    /// pooled keep-alive connection that a stopping backend just closed).
    /// It may have seen the request, so only idempotent requests with no
    /// body are retried.
    UpstreamClosed,
    /// The backend broke the connection or spoke bad HTTP.
    UpstreamProtocol,
    /// The request body is larger than the configured limit.
    BodyTooLarge,
    /// The client's request body broke while it was being forwarded: bad
    /// chunked framing, or the client gone mid-upload.
    ClientBody,
    /// The request's header list is larger than the configured limit
    /// (HTTP/2: hyper answers HTTP/1 itself).
    HeadersTooLarge,
    /// No usable Host, or a request form the router does not forward.
    BadRequest,
    /// A method the router does not forward (CONNECT).
    MethodNotAllowed,
}

/// Whether a failure of this kind allows sending the request elsewhere.
pub fn retry_type(kind: ErrorKind) -> RetryType {
    match kind {
        ErrorKind::Connect => RetryType::Safe,
        // RFC 9110 9.2.2: a request idempotent by its method may be
        // sent again when the connection failed before the answer.
        ErrorKind::UpstreamClosed | ErrorKind::UpstreamProtocol => RetryType::IdempotentOnly,
        _ => RetryType::Unsafe,
    }
}

/// A proxy failure.
#[derive(Debug)]
pub struct ProxyError {
    pub kind: ErrorKind,
    pub cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ProxyError {
    pub fn new(kind: ErrorKind) -> Self {
        ProxyError { kind, cause: None }
    }

    pub fn with_cause(
        kind: ErrorKind,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        ProxyError {
            kind,
            cause: Some(cause.into()),
        }
    }

    pub fn source_of_fault(&self) -> ErrorSource {
        match self.kind {
            ErrorKind::NoRoute | ErrorKind::NoBackend => ErrorSource::Internal,
            ErrorKind::Connect
            | ErrorKind::UpstreamTimeout
            | ErrorKind::UpstreamClosed
            | ErrorKind::UpstreamProtocol => ErrorSource::Upstream,
            ErrorKind::BodyTooLarge
            | ErrorKind::HeadersTooLarge
            | ErrorKind::ClientBody
            | ErrorKind::BadRequest
            | ErrorKind::MethodNotAllowed => ErrorSource::Downstream,
        }
    }

    pub fn retry(&self) -> RetryType {
        retry_type(self.kind)
    }

    /// The one mapping from error to status code.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Connect | ErrorKind::UpstreamClosed | ErrorKind::UpstreamProtocol => {
                StatusCode::BAD_GATEWAY
            }
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind::BadRequest | ErrorKind::ClientBody => StatusCode::BAD_REQUEST,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The plain-text body: the status line only, nothing internal.
    pub fn body(&self) -> String {
        let s = self.status();
        format!("{} {}\n", s.as_u16(), s.canonical_reason().unwrap_or(""))
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.kind)?;
        if let Some(c) = &self.cause {
            write!(f, ": {c}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProxyError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_retry() {
        assert_eq!(ProxyError::new(ErrorKind::NoBackend).status(), 503);
        assert_eq!(ProxyError::new(ErrorKind::Connect).status(), 502);
        assert_eq!(ProxyError::new(ErrorKind::UpstreamTimeout).status(), 504);
        assert_eq!(ProxyError::new(ErrorKind::Connect).retry(), RetryType::Safe);
        assert_eq!(
            ProxyError::new(ErrorKind::UpstreamProtocol).retry(),
            RetryType::IdempotentOnly
        );
        assert_eq!(
            ProxyError::new(ErrorKind::UpstreamTimeout).retry(),
            RetryType::Unsafe
        );
        assert_eq!(
            ProxyError::new(ErrorKind::NoRoute).body(),
            "404 Not Found\n"
        );
    }
}
