//! portless-dns
