//! The control plane of encrypted overlays on a 2-node lab: each node's
//! WireGuard key reaches `node inspect` through its heartbeats, the key
//! file is private, `node update --rotate-key` replaces a key within a few
//! seconds, and who may ask for it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use serde_json::Value;

fn inspect(lab: &mesh_lab::Lab, via: &str, node: &str) -> Result<Value> {
    let out = lab.mesh_ok(via, &["node", "inspect", node])?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("not JSON: {out}"))?;
    Ok(v[0]["Encryption"].clone())
}

fn public_key(lab: &mesh_lab::Lab, node: &str) -> Option<String> {
    let e = inspect(lab, "node1", node).ok()?;
    e["PublicKey"]
        .as_str()
        .filter(|k| !k.is_empty())
        .map(String::from)
}

fn info(lab: &mesh_lab::Lab, node: &str) -> Result<Value> {
    let out = lab.mesh_ok(node, &["info", "--format", "json"])?;
    Ok(serde_json::from_str::<Value>(&out)?["Swarm"].clone())
}

#[test]
fn node_keys_are_reported_private_and_rotated() -> Result<()> {
    let mut lab = up("ek", 2, 1, &["--encryption-key-rotation", "12h"])?;
    let limit = Duration::from_secs(10);
    let (k1, _) = wait_for("node1's key in node inspect", limit, || {
        public_key(&lab, "node1")
    })?;
    let (k2, _) = wait_for("node2's key in node inspect", limit, || {
        public_key(&lab, "node2")
    })?;
    ensure!(k1 != k2, "two nodes, one key: {k1}");
    for (node, key) in [("node1", &k1), ("node2", &k2)] {
        ensure!(key.len() == 44 && key.ends_with('='), "{node}: {key}");
        // What the node says of itself is what the managers recorded.
        let i = info(&lab, node)?;
        ensure!(i["Encryption"]["PublicKey"] == key.as_str(), "{node}: {i}");
        ensure!(i["EncryptionKeyRotation"] == "12h", "{node}: {i}");
        let file = lab.node(node)?.state_dir.join("wireguard.json");
        let mode = std::fs::metadata(&file)
            .with_context(|| format!("{}", file.display()))?
            .permissions()
            .mode();
        ensure!(mode & 0o777 == 0o600, "{}: {:o}", file.display(), mode);
        let text = std::fs::read_to_string(&file)?;
        ensure!(
            !text.contains(key.as_str()),
            "the file holds the private key, not the public one"
        );
    }
    let text = lab.mesh_ok("node2", &["info"])?;
    ensure!(text.contains(&format!("Public Key: {k2}")), "{text}");
    ensure!(text.contains("Encryption Key Rotation: 12h"), "{text}");

    // Only managers may ask, and only for a node that exists.
    refused(
        &lab,
        "node2",
        &["node", "update", "--rotate-key", "node1"],
        "not a manager",
    )?;
    refused(
        &lab,
        "node1",
        &["node", "update", "--rotate-key", "nosuch"],
        "not found",
    )?;
    ensure!(inspect(&lab, "node1", "node1")?["KeyRotations"] == 0);
    ensure!(
        public_key(&lab, "node1").as_deref() == Some(k1.as_str()),
        "a refusal rotated"
    );

    lab.mesh_ok("node1", &["node", "update", "--rotate-key", "node2"])?;
    let (new2, took) = wait_for("node2's new key", limit, || {
        public_key(&lab, "node2").filter(|k| *k != k2)
    })?;
    println!("node2's key rotated in {took:?}");
    ensure!(took < Duration::from_secs(5), "rotation took {took:?}");
    ensure!(new2 != k1);
    ensure!(inspect(&lab, "node1", "node2")?["KeyRotations"] == 1);
    ensure!(
        public_key(&lab, "node1").as_deref() == Some(k1.as_str()),
        "only node2 rotates"
    );
    ensure!(info(&lab, "node2")?["Encryption"]["PublicKey"] == new2.as_str());

    // A restart keeps the key, and does not rotate again for the same ask.
    lab.kill("node2")?;
    lab.start("node2")?;
    let (after, _) = wait_for("node2 back", Duration::from_secs(20), || {
        info(&lab, "node2")
            .ok()
            .filter(|i| i["LocalNodeState"] == "active")
    })?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(after["Encryption"]["PublicKey"] == new2.as_str(), "{after}");
    ensure!(public_key(&lab, "node2").as_deref() == Some(new2.as_str()));
    lab.down()?;
    Ok(())
}

/// `--encryption-key-rotation` replaces a key once it is that old, with no
/// one asking (the shortest allowed interval: a minute).
#[test]
fn keys_rotate_on_the_cluster_interval() -> Result<()> {
    let lab = up("ei", 1, 1, &["--encryption-key-rotation", "1m"])?;
    let (k1, _) = wait_for("node1's key", Duration::from_secs(10), || {
        public_key(&lab, "node1")
    })?;
    ensure!(info(&lab, "node1")?["EncryptionKeyRotation"] == "1m");
    let (k2, took) = wait_for("an interval rotation", Duration::from_secs(80), || {
        public_key(&lab, "node1").filter(|k| *k != k1)
    })?;
    println!("rotated after {took:?}");
    ensure!(
        took > Duration::from_secs(40),
        "rotated too early: {took:?}"
    );
    ensure!(
        inspect(&lab, "node1", "node1")?["KeyRotations"] == 0,
        "no one asked"
    );
    ensure!(info(&lab, "node1")?["Encryption"]["PublicKey"] == k2.as_str());
    lab.down()?;
    Ok(())
}
