//! Integration tests: the real `molecule` binary against the real `molecule-emulator`
//! on 127.0.0.1. One test binary, a module per area.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod a2a;
mod ack;
mod cli;
mod commands;
mod connect;
mod delegations;
mod events;
mod fault;
mod hardening;
mod ops;
mod rate;
mod supervise;
mod tools;
mod wake;
mod worker;
