//! portless-netplane
