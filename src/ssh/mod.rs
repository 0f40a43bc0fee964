//! The SSH transport.
