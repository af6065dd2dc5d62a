//! The command line refuses what it cannot do before it talks to a daemon:
//! these run the built binary against a socket that does not exist, so the
//! parse error is the only thing that can come out.

use std::process::{Command, Output};

use anyhow::Result;

fn mesh(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["-H", "/nonexistent/mesh-cli-test.sock"])
        .args(args)
        .output()?)
}

/// Exit status 2 (usage) and exactly one line on stderr that names `what`.
fn assert_usage_error(args: &[&str], what: &str) -> Result<()> {
    let out = mesh(args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.contains(what), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}");
    Ok(())
}

#[test]
fn bad_service_ports_are_one_line_usage_errors() -> Result<()> {
    for (spec, what) in [
        ("published=8080", "target port is missing"),
        ("published=0,target=80", "out of range"),
        ("target=80,mode=global", "unknown mode"),
        ("target=80,protocol=sctp", "unknown protocol"),
        ("8080:80:1", "expected PUBLISHED:TARGET"),
    ] {
        assert_usage_error(
            &[
                "service",
                "create",
                "--name",
                "s",
                "--publish",
                spec,
                "sleep",
                "1",
            ],
            what,
        )?;
    }
    Ok(())
}

#[test]
fn bad_key_rotation_intervals_are_one_line_usage_errors() -> Result<()> {
    for (value, what) in [
        ("10s", "at least 1m"),
        ("59s", "at least 1m"),
        ("abc", "invalid duration"),
        ("12 parsecs", "invalid duration"),
    ] {
        assert_usage_error(&["init", "--encryption-key-rotation", value], what)?;
    }
    Ok(())
}

#[test]
fn unknown_flags_before_the_command_are_errors() -> Result<()> {
    assert_usage_error(&["run", "-d", "--bogus", "--", "sleep", "1"], "--bogus")?;
    assert_usage_error(&["exec", "x", "--bogus", "ls"], "--bogus")?;
    assert_usage_error(
        &["service", "create", "--name", "s", "--bogus", "sleep", "1"],
        "--bogus",
    )?;
    assert_usage_error(&["lab", "exec", "l", "node1", "--bogus", "ls"], "--bogus")
}

#[test]
fn bad_port_bindings_are_one_line_usage_errors() -> Result<()> {
    assert_usage_error(
        &["run", "-d", "-p", "0:80", "--", "sleep", "1"],
        "out of range",
    )?;
    assert_usage_error(
        &["run", "-d", "-p", "80/sctp", "--", "sleep", "1"],
        "unknown protocol",
    )?;
    assert_usage_error(
        &["run", "-d", "-p", "1.2.3:8080:80", "--", "sleep", "1"],
        "not an IPv4 address",
    )?;
    assert_usage_error(&["port"], "required")
}
