//! Empty library target: it lets `lb-userspace` name this crate as a build dependency so cargo
//! rebuilds the BPF object when it changes. The programs are in `main.rs`.
#![no_std]
