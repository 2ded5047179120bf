//! Retry and ejection decisions, as plain functions of what happened: the
//! failure's kind, the attempt, the request's method and body, and the time
//! (passed in, never read here). The proxy acts on the [`Outcome`]; this
//! module does no I/O and holds no state.

use std::time::Duration;

use http::Method;

use crate::error::{ErrorKind, RetryType, retry_type};

/// Most attempts for one request, over distinct backends.
pub const MAX_ATTEMPTS: usize = 3;

/// What is known of a request when deciding about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTraits {
    /// Idempotent by its method (RFC 9110 9.2.2).
    pub idempotent: bool,
    /// It has no body: only such a request can be sent again (bodies are
    /// streamed, not buffered).
    pub body_empty: bool,
}

impl RequestTraits {
    pub fn of(method: &Method, body_empty: bool) -> Self {
        RequestTraits {
            idempotent: idempotent(method),
            body_empty,
        }
    }
}

/// GET, HEAD, OPTIONS, PUT, DELETE and TRACE.
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// How many backends a request may be tried on: up to [`MAX_ATTEMPTS`] of
/// the route's, one for a request with a body.
pub fn max_attempts(backends: usize, req: RequestTraits) -> usize {
    if req.body_empty {
        backends.min(MAX_ATTEMPTS)
    } else {
        1
    }
}

/// What to do after attempt `attempt` (1-based) failed with `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Eject the backend until this time (the caller's clock, in ms).
    pub eject_until_ms: Option<u64>,
    /// Send the request to another backend.
    pub retry: bool,
}

/// The decision after a failed attempt. A backend is ejected only for a
/// failed connect (it refused or did not answer the handshake: it is down,
/// not slow, and nothing of the request reached it); the request goes to
/// another backend when the failure allows it for this request and
/// attempts are left.
pub fn after_failure(
    kind: ErrorKind,
    attempt: usize,
    max_attempts: usize,
    req: RequestTraits,
    now_ms: u64,
    eject_for: Duration,
) -> Outcome {
    let eject_until_ms = (kind == ErrorKind::Connect)
        .then(|| now_ms.saturating_add(u64::try_from(eject_for.as_millis()).unwrap_or(u64::MAX)));
    let allowed = match retry_type(kind) {
        RetryType::Safe => true,
        RetryType::IdempotentOnly => req.idempotent,
        RetryType::Unsafe => false,
    };
    Outcome {
        eject_until_ms,
        retry: allowed && attempt < max_attempts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorKind::*;

    const GET: RequestTraits = RequestTraits {
        idempotent: true,
        body_empty: true,
    };
    const POST_EMPTY: RequestTraits = RequestTraits {
        idempotent: false,
        body_empty: true,
    };
    const POST_BODY: RequestTraits = RequestTraits {
        idempotent: false,
        body_empty: false,
    };
    const PUT_BODY: RequestTraits = RequestTraits {
        idempotent: true,
        body_empty: false,
    };

    #[test]
    fn attempts_by_backends_and_body() {
        for (backends, req, want) in [
            (0, GET, 0),
            (1, GET, 1),
            (2, GET, 2),
            (3, GET, 3),
            (10, GET, 3),
            (10, POST_EMPTY, 3),
            (10, POST_BODY, 1),
            (10, PUT_BODY, 1),
            (1, POST_BODY, 1),
        ] {
            assert_eq!(max_attempts(backends, req), want, "{backends} {req:?}");
        }
    }

    #[test]
    fn methods() {
        for (m, want) in [
            (Method::GET, true),
            (Method::HEAD, true),
            (Method::OPTIONS, true),
            (Method::PUT, true),
            (Method::DELETE, true),
            (Method::TRACE, true),
            (Method::POST, false),
            (Method::PATCH, false),
            (Method::CONNECT, false),
        ] {
            assert_eq!(idempotent(&m), want, "{m}");
        }
    }

    #[test]
    fn retry_and_eject_table() {
        let eject = Duration::from_secs(10);
        // (failure, attempt, max, request) -> (ejected until, retry)
        type Row = (ErrorKind, usize, usize, RequestTraits, Option<u64>, bool);
        let table: &[Row] = &[
            // A refused connect: eject for eject_for from now; retry any
            // request with attempts left (nothing reached the backend).
            (Connect, 1, 3, GET, Some(10_100), true),
            (Connect, 1, 3, POST_EMPTY, Some(10_100), true),
            (Connect, 2, 3, GET, Some(10_100), true),
            (Connect, 3, 3, GET, Some(10_100), false),
            (Connect, 1, 1, POST_BODY, Some(10_100), false),
            // Closed before the answer: the backend may have seen it; only
            // idempotent requests go again, and nobody is ejected.
            (UpstreamClosed, 1, 3, GET, None, true),
            (UpstreamClosed, 1, 3, POST_EMPTY, None, false),
            (UpstreamClosed, 3, 3, GET, None, false),
            (UpstreamProtocol, 1, 2, GET, None, true),
            (UpstreamProtocol, 1, 2, POST_EMPTY, None, false),
            // Too slow: the backend may be working on it; never again.
            (UpstreamTimeout, 1, 3, GET, None, false),
            // The client's fault or the router's: no retry, no ejection.
            (ClientBody, 1, 1, PUT_BODY, None, false),
            (BodyTooLarge, 1, 1, POST_BODY, None, false),
            (BadRequest, 1, 3, GET, None, false),
            (HeadersTooLarge, 1, 3, GET, None, false),
            (NoBackend, 1, 3, GET, None, false),
        ];
        for &(kind, attempt, max, req, until, retry) in table {
            assert_eq!(
                after_failure(kind, attempt, max, req, 100, eject),
                Outcome {
                    eject_until_ms: until,
                    retry
                },
                "{kind:?} attempt {attempt}/{max} {req:?}"
            );
        }
    }

    #[test]
    fn ejection_time_saturates() {
        let o = after_failure(Connect, 1, 1, GET, u64::MAX - 5, Duration::from_secs(3600));
        assert_eq!(o.eject_until_ms, Some(u64::MAX));
    }
}
