//! End-to-end tests of the security review (issue 10): one test per finding,
//! each on a lab of its own. Findings that live in one part of the system
//! have their tests in a module of their own under `tests/security/`.

mod common;

#[path = "security/files.rs"]
mod files;
