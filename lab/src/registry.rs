//! The labs on this machine: where each keeps its state (`lab.json` under
//! [`LAB_ROOT`]), the lock that serializes changes to them, listing them
//! (leftovers of crashed runs included) and removing one by name.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{LabError, Result};
use crate::lab::Lab;
use crate::names;
use crate::sys;
use crate::teardown::teardown;

/// Where labs keep their state; under /run so a reboot (which also drops
/// every namespace) forgets them too.
pub const LAB_ROOT: &str = "/run/mesh-lab";

/// Directory of lab `name`.
pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

pub(crate) fn state_file(name: &str) -> PathBuf {
    lab_dir(name).join("lab.json")
}

pub(crate) fn require_root() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(LabError::NotRoot)
    }
}

/// Serializes changes to lab state across `mesh lab` processes (subnet
/// picking, name reservation, lab.json updates).
pub(crate) fn lock_root() -> Result<Flock<File>> {
    fs::create_dir_all(LAB_ROOT).map_err(|e| LabError::io(format!("creating {LAB_ROOT}"), e))?;
    let path = Path::new(LAB_ROOT).join(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| LabError::io(format!("opening {}", path.display()), e))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| LabError::sys(format!("locking {}", path.display()), e))
}

/// Reads lab.json of `name`; None if there is none.
pub(crate) fn read_state(name: &str) -> Result<Option<Lab>> {
    let path = state_file(name);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(LabError::State {
                lab: name.into(),
                path,
                reason: e.to_string(),
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| LabError::State {
            lab: name.into(),
            path,
            reason: e.to_string(),
        })
}

/// Namespaces on this machine that belong to lab `name`.
pub(crate) fn owned_netns(name: &str) -> Vec<String> {
    let mut v: Vec<String> = sys::list_netns()
        .into_iter()
        .filter(|ns| names::parse_netns(ns).is_some_and(|(lab, _)| lab == name))
        .collect();
    v.sort();
    v
}

/// What `mesh lab ls` shows for one lab.
#[derive(Debug)]
pub struct LabListing {
    pub name: String,
    /// The lab's state, if its lab.json is readable.
    pub lab: Option<Lab>,
    /// Why lab.json is unusable, if it is.
    pub problem: Option<String>,
    /// Namespaces of this lab name left without a lab.json (a crashed run).
    pub stale_netns: Vec<String>,
}

/// Every lab on this machine, including leftovers of crashed runs.
pub fn list() -> Result<Vec<LabListing>> {
    let mut out: BTreeMap<String, LabListing> = BTreeMap::new();
    if let Ok(dir) = fs::read_dir(LAB_ROOT) {
        for entry in dir.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if names::validate_lab_name(&name).is_err() || !entry.path().is_dir() {
                continue;
            }
            let (lab, problem) = match read_state(&name) {
                Ok(Some(lab)) => (Some(lab), None),
                Ok(None) => (None, Some("no lab.json (interrupted run)".to_string())),
                Err(e) => (None, Some(e.to_string())),
            };
            out.insert(
                name.clone(),
                LabListing {
                    name,
                    lab,
                    problem,
                    stale_netns: Vec::new(),
                },
            );
        }
    }
    for ns in sys::list_netns() {
        if let Some((lab, _)) = names::parse_netns(&ns) {
            let entry = out.entry(lab.clone()).or_insert_with(|| LabListing {
                name: lab,
                lab: None,
                problem: Some("leftover namespaces without lab state (crashed run)".into()),
                stale_netns: Vec::new(),
            });
            if entry.lab.is_none() {
                entry.stale_netns.push(ns);
            }
        }
    }
    Ok(out.into_values().collect())
}

/// Tears down lab `name`: daemons, processes in its namespaces, namespaces,
/// links, files. Works on half-made and crashed labs (it also finds
/// namespaces named after the lab without any state), keeps going past
/// failures and reports them all.
pub fn down(name: &str) -> Result<()> {
    names::validate_lab_name(name)?;
    require_root()?;
    let (nodes, hosts) = match read_state(name) {
        Ok(Some(lab)) => (lab.nodes.clone(), lab.hosts.clone()),
        Ok(None) => (Vec::new(), Vec::new()),
        Err(e) => {
            tracing::warn!(lab = name, error = %e, "lab state unreadable; removing what can be found by name");
            (Vec::new(), Vec::new())
        }
    };
    if nodes.is_empty() && !lab_dir(name).exists() && owned_netns(name).is_empty() {
        return Err(LabError::NotFound(name.into()));
    }
    teardown(name, &nodes, &hosts, &mut HashMap::new())
}

/// Removes whatever a previous (crashed) run left under lab name `name`;
/// Ok(false) when there was nothing. Tests call it before [`Lab::up`].
pub fn cleanup_stale(name: &str) -> Result<bool> {
    match down(name) {
        Ok(()) => Ok(true),
        Err(LabError::NotFound(_)) => Ok(false),
        Err(e) => Err(e),
    }
}
