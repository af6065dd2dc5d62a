//! Setup shared by the worker's kernel tests: namespaces that are removed
//! even when an assertion fails, running commands in them, and the root
//! check that makes a run without root fail instead of pass.
#![allow(dead_code)]

use std::process::{Command, Output};

use mesh_worker::link::Netlink;
use mesh_worker::netns;

/// Removes the namespaces it lists when dropped, so a failing assertion
/// leaves nothing behind. Devices go with their namespaces.
pub struct Cleanup(pub Vec<String>);

impl Cleanup {
    pub fn add(&mut self, ns: &str) {
        self.0.push(ns.to_string());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for ns in self.0.iter().rev() {
            if let Err(e) = netns::delete(ns) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// These tests need root: without it they fail, so a run that could not
/// test says so instead of passing. `what` names the tests.
pub fn require_root(what: &str) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "needs root: {what} make namespaces and devices"
    );
}

pub fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

/// Runs a command inside a namespace and insists it succeeds.
pub fn exec_ok(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    let out = run(&full);
    assert!(
        out.status.success(),
        "{full:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes a namespace with `lo` up, removed by `cleanup`.
pub async fn namespace(name: &str, cleanup: &mut Cleanup) -> Netlink {
    cleanup.add(name);
    netns::create(name).expect("create namespace");
    let nl = Netlink::open(Some(name)).await.expect("netlink");
    nl.set_up("lo").await.expect("lo up");
    nl
}
