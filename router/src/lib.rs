//! portless-router
