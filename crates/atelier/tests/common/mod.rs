//! Compatibility shim: the harness lives in the `atelier-testkit` crate now. Existing
//! `mod common; use common::Server;` lines keep working; new tests may use the kit
//! directly.
#![allow(unused_imports)]

pub use atelier_testkit::manager::*;
pub use atelier_testkit::public::*;
pub use atelier_testkit::{alive, group_members, poll_until, poll_until_async, wait_until};
