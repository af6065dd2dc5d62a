//! `mesh init`: the cluster's network settings with Docker's defaults,
//! checked before anything is created, and the first manager's record.

use mesh_common::ipam;
use mesh_common::model::{Availability, NodeRole, NodeState};

use std::time::Duration;

use crate::state::{
    DEFAULT_DATA_PATH_PORT, DEFAULT_DOWN_BEATS, DEFAULT_HEARTBEAT, DEFAULT_MASK_LEN, DEFAULT_POOL,
    Node,
};
use mesh_common::refusal::Refusal;

/// Address pools, carve mask and VXLAN port a cluster starts with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkSettings {
    pub pools: Vec<String>,
    pub mask_len: u8,
    pub data_path_port: u16,
}

/// `--default-addr-pool`, `--default-addr-pool-mask-length` and
/// `--data-path-port` as given (empty or 0 when left out), checked, with
/// the defaults filled in.
pub fn network_settings(
    pools: &[String],
    mask_len: u32,
    data_path_port: u32,
) -> Result<NetworkSettings, Refusal> {
    let pools = if pools.is_empty() {
        vec![DEFAULT_POOL.to_string()]
    } else {
        pools.to_vec()
    };
    let parsed = pools
        .iter()
        .map(|s| {
            ipam::parse_pool(s)
                .and_then(|n| ipam::check_usable(&n, "address pool").map(|()| n))
                .map_err(|e| Refusal::invalid(format!("--default-addr-pool: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (i, a) in parsed.iter().enumerate() {
        for b in &parsed[i + 1..] {
            if ipam::overlaps(a, b) {
                return Err(Refusal::invalid(format!(
                    "--default-addr-pool {a} overlaps {b}: give pools that do not overlap"
                )));
            }
        }
    }
    let mask_len = match mask_len {
        0 => DEFAULT_MASK_LEN,
        m if m > 29 => {
            return Err(Refusal::invalid(format!(
                "--default-addr-pool-mask-length {m} is too long: networks need at least a /29"
            )));
        }
        m => m as u8,
    };
    if let Some(short) = parsed.iter().find(|n| n.prefix_len() > mask_len) {
        return Err(Refusal::invalid(format!(
            "--default-addr-pool-mask-length {mask_len} is shorter than pool {short}'s prefix: use a mask of at least /{}",
            short.prefix_len()
        )));
    }
    let data_path_port = match data_path_port {
        0 => DEFAULT_DATA_PATH_PORT,
        n if (1024..=49151).contains(&n) => n as u16,
        n => {
            return Err(Refusal::invalid(format!(
                "--data-path-port {n} is out of range: use a port between 1024 and 49151"
            )));
        }
    };
    Ok(NetworkSettings {
        pools,
        mask_len,
        data_path_port,
    })
}

/// The shortest `--encryption-key-rotation`: every rotation is a new
/// handshake with every peer, so a shorter one buys nothing but churn.
pub const MIN_KEY_ROTATION_SECS: u64 = 60;

/// The longest `--encryption-key-rotation`: a year. Longer is a typo; for
/// no rotation at all, 0 says so.
pub const MAX_KEY_ROTATION_SECS: u64 = 365 * 24 * 3600;

/// `--encryption-key-rotation` in seconds, checked (0 = never rotate).
pub fn key_rotation(secs: u64) -> Result<u64, Refusal> {
    if secs != 0 && secs < MIN_KEY_ROTATION_SECS {
        return Err(Refusal::invalid(format!(
            "--encryption-key-rotation {secs}s is too short: use at least 1m, or 0 for never"
        )));
    }
    if secs > MAX_KEY_ROTATION_SECS {
        return Err(Refusal::invalid(format!(
            "--encryption-key-rotation {secs}s is too long: use at most 8760h (a year), or 0 for never"
        )));
    }
    Ok(secs)
}

/// The shortest `--dispatcher-heartbeat`: below it the heartbeats cost the
/// leader more than the faster detection is worth.
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// The longest `--dispatcher-heartbeat`: a minute. Longer is a typo.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(60);
/// `--node-down-grace` must cover this many periods: with fewer, one late
/// heartbeat would be enough to call a live node down.
pub const MIN_DOWN_BEATS: u32 = 3;
/// The longest `--node-down-grace`: an hour. Longer is a typo.
pub const MAX_DOWN_GRACE: Duration = Duration::from_secs(3600);

/// The heartbeat period and the down grace a cluster keeps, in ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    pub heartbeat_ms: u64,
    pub down_grace_ms: u64,
}

/// `--dispatcher-heartbeat` and `--node-down-grace` in ms as given (0 when
/// left out), checked, with the defaults filled in: the grace defaults to
/// [`DEFAULT_DOWN_BEATS`] periods.
pub fn liveness(heartbeat_ms: u64, down_grace_ms: u64) -> Result<Liveness, Refusal> {
    let period = match heartbeat_ms {
        0 => DEFAULT_HEARTBEAT,
        ms => Duration::from_millis(ms),
    };
    if period < MIN_HEARTBEAT || period > MAX_HEARTBEAT {
        return Err(Refusal::invalid(format!(
            "--dispatcher-heartbeat {} is out of range: use 100ms to 1m",
            text(period)
        )));
    }
    let grace = match down_grace_ms {
        0 => period * DEFAULT_DOWN_BEATS,
        ms => Duration::from_millis(ms),
    };
    if grace < period * MIN_DOWN_BEATS {
        return Err(Refusal::invalid(format!(
            "--node-down-grace {} is too short for a {} heartbeat: use at least {} ({MIN_DOWN_BEATS} periods), so a late heartbeat does not call a live node down",
            text(grace),
            text(period),
            text(period * MIN_DOWN_BEATS)
        )));
    }
    if grace > MAX_DOWN_GRACE {
        return Err(Refusal::invalid(format!(
            "--node-down-grace {} is too long: use at most 1h",
            text(grace)
        )));
    }
    Ok(Liveness {
        heartbeat_ms: period.as_millis() as u64,
        down_grace_ms: grace.as_millis() as u64,
    })
}

/// A duration as a user types it ("200ms", "1s 500ms").
pub fn text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The node that initializes a cluster: its first manager, active, in
/// state unknown until its first heartbeat. Identity fields (ID, Raft ID,
/// addresses, certificate) are the caller's.
pub fn first_manager(node: Node) -> Node {
    Node {
        role: NodeRole::Manager,
        availability: Availability::Active,
        state: NodeState::Unknown,
        ..node
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in() {
        assert_eq!(
            network_settings(&[], 0, 0),
            Ok(NetworkSettings {
                pools: vec!["10.0.0.0/8".into()],
                mask_len: 24,
                data_path_port: 4789,
            })
        );
    }

    #[test]
    fn bad_settings_are_refused_before_anything_is_made() {
        let two = ["10.0.0.0/8".to_string(), "10.1.0.0/16".into()];
        assert!(network_settings(&two, 0, 0).is_err_and(|e| e.contains("overlaps")));
        assert!(network_settings(&[], 30, 0).is_err_and(|e| e.contains("too long")));
        let narrow = ["10.20.0.0/20".to_string()];
        assert!(network_settings(&narrow, 16, 0).is_err_and(|e| e.contains("shorter than pool")));
        assert!(network_settings(&[], 0, 80).is_err_and(|e| e.contains("out of range")));
        assert!(
            network_settings(&["nope".into()], 0, 0)
                .is_err_and(|e| e.contains("--default-addr-pool"))
        );
    }

    #[test]
    fn liveness_defaults_and_bounds() {
        assert_eq!(
            liveness(0, 0),
            Ok(Liveness {
                heartbeat_ms: 200,
                down_grace_ms: 800
            })
        );
        assert_eq!(
            liveness(5000, 0),
            Ok(Liveness {
                heartbeat_ms: 5000,
                down_grace_ms: 20000
            })
        );
        assert_eq!(
            liveness(0, 600),
            Ok(Liveness {
                heartbeat_ms: 200,
                down_grace_ms: 600
            })
        );
        assert!(liveness(99, 0).is_err_and(|e| e.contains("100ms to 1m")));
        assert!(liveness(60_001, 0).is_err_and(|e| e.contains("out of range")));
        assert!(liveness(0, 599).is_err_and(|e| e.contains("at least 600ms")));
        assert!(liveness(1000, 2000).is_err_and(|e| e.contains("too short for a 1s heartbeat")));
        assert!(liveness(60_000, 0).is_ok());
        assert!(liveness(0, 3_600_001).is_err_and(|e| e.contains("at most 1h")));
    }

    #[test]
    fn key_rotation_is_never_or_at_least_a_minute() {
        assert_eq!(key_rotation(0), Ok(0));
        assert_eq!(key_rotation(60), Ok(60));
        assert_eq!(key_rotation(43200), Ok(43200));
        assert!(key_rotation(59).is_err_and(|e| e.contains("at least 1m")));
        assert!(key_rotation(1).is_err());
        assert_eq!(
            key_rotation(MAX_KEY_ROTATION_SECS),
            Ok(MAX_KEY_ROTATION_SECS)
        );
        assert!(
            key_rotation(MAX_KEY_ROTATION_SECS + 1).is_err_and(|e| e.contains("at most 8760h"))
        );
    }
}
