//! The data plane: the XDP program and its maps.

pub mod xdp;
