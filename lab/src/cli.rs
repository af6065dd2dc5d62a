//! `mesh lab ...`: the command-line face of the harness. Parsing and printing
//! only; the work is in [`crate::Lab`] and the `registry`.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::error::{LabError, Result};
use crate::faults::parse_groups;
use crate::lab::{Lab, UNDERLAY_BRIDGE};
use crate::registry::{self, LabListing};
use crate::spec::{LabStatus, UpSpec};
use crate::sys;

/// Output format of `mesh lab ls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// `mesh lab` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum LabCommand {
    /// Create a lab: N network namespaces on one underlay bridge, one `mesh daemon` each, formed into a cluster
    Up {
        /// Number of nodes
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// How many of them are managers (node1..nodeM)
        #[arg(long, default_value_t = 1)]
        managers: usize,
        /// Outside hosts host1..hostN on the underlay: no daemon, not cluster
        /// nodes; clients for published ports (`mesh lab exec LAB host1 -- curl ...`)
        #[arg(long, default_value_t = 0)]
        hosts: usize,
        /// Lab name: up to 12 of a-z, 0-9, '-'
        #[arg(long, default_value = "lab")]
        name: String,
        /// Extra argument for `mesh init` (repeat it: --init-arg=--cert-expiry --init-arg=1m)
        #[arg(long = "init-arg", value_name = "ARG", allow_hyphen_values = true)]
        init_args: Vec<String>,
        /// Extra argument for every `mesh daemon` (repeatable)
        #[arg(long = "daemon-arg", value_name = "ARG", allow_hyphen_values = true)]
        daemon_args: Vec<String>,
        /// Seconds to wait for every node to be Ready
        #[arg(long, value_name = "SECONDS", default_value_t = 90)]
        timeout: u64,
    },
    /// List labs, their nodes and whether each daemon runs
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Run a command inside a node (its network and hostname), with MESH_HOST set to its daemon, or inside an outside host
    Exec {
        lab: String,
        /// node2, or just 2; or an outside host (host1)
        node: String,
        /// Command and arguments (after `--`, or from the first word that is
        /// not a flag). No `allow_hyphen_values`: an unknown flag before the
        /// command is an error, not the command to run.
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// SIGKILL a node's daemon (a crash; its workloads and kernel state stay)
    Kill { lab: String, node: String },
    /// Start a node's daemon again on the same state dir and socket
    Start { lab: String, node: String },
    /// Cut a node's underlay link (as if its cable were pulled)
    Cut { lab: String, node: String },
    /// Restore a node's underlay link; without NODE, restore everything:
    /// partitions, cut links, control cuts, paused daemons
    Heal { lab: String, node: Option<String> },
    /// Cut the underlay between groups of nodes, and only between them:
    /// `mesh lab partition LAB node1,node2 node3,node4,node5` (replaces any
    /// earlier partition; `mesh lab heal LAB` removes it)
    Partition {
        lab: String,
        /// Comma-separated node (or host) names, one argument per group
        #[arg(required = true, num_args = 2.., value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// Freeze a node's daemon (SIGSTOP); its sandboxes keep running
    Pause { lab: String, node: String },
    /// Thaw a paused daemon (SIGCONT)
    Resume { lab: String, node: String },
    /// Remove a lab: daemons, processes, namespaces, links and files (also after a crash)
    Down { lab: String },
    /// Join N simulated nodes to the lab's managers: real joins, heartbeats
    /// and view streams, no kernel work; runs until interrupted, then they
    /// leave. Commands on stdin: `kill K` (K nodes fall silent), `stats`
    Sim {
        lab: String,
        /// How many simulated nodes
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        /// How many joins are in flight at once
        #[arg(long, default_value_t = 32)]
        join_concurrency: usize,
    },
}

/// Runs one `mesh lab` command. `mesh_bin` is the `mesh` binary that daemons
/// and `mesh` commands in nodes are started from (normally the running one).
///
/// `exec` exits the process with the command's exit status when it is not 0.
pub fn run(cmd: LabCommand, mesh_bin: &Path) -> Result<()> {
    dispatch(cmd, mesh_bin).map_err(LabError::into_one_line)
}

fn dispatch(cmd: LabCommand, mesh_bin: &Path) -> Result<()> {
    match cmd {
        LabCommand::Up {
            nodes,
            managers,
            hosts,
            name,
            init_args,
            daemon_args,
            timeout,
        } => {
            let spec = UpSpec {
                name,
                nodes,
                managers,
                hosts,
                init_args,
                daemon_args,
                ready_timeout: Duration::from_secs(timeout),
                progress: true,
                ..UpSpec::default()
            };
            sys::catch_interrupts()?;
            let lab = Lab::up(&spec, mesh_bin)?;
            print_up(&lab);
            lab.keep();
            Ok(())
        }
        LabCommand::Ls { format } => {
            let labs = registry::list()?;
            match format {
                Format::Table => print_ls_table(&labs),
                Format::Json => {
                    for l in &labs {
                        println!("{}", listing_json(l));
                    }
                }
            }
            Ok(())
        }
        LabCommand::Exec { lab, node, cmd } => {
            let lab = Lab::open(&lab, mesh_bin)?;
            let (program, args) = cmd
                .split_first()
                .ok_or_else(|| LabError::InvalidSpec("exec needs a command to run".into()))?;
            let mut c = lab.command(&node, program)?;
            c.args(args);
            let status = match c.status() {
                Ok(status) => status,
                Err(e) => {
                    // As a shell does: 127 when there is no such command, 126 when it cannot run.
                    eprintln!("mesh lab exec: {program}: {e}");
                    let code = match e.kind() {
                        std::io::ErrorKind::NotFound => 127,
                        _ => 126,
                    };
                    std::process::exit(code);
                }
            };
            if !status.success() {
                let _ = std::io::stdout().flush();
                std::process::exit(sys::shell_code(status));
            }
            Ok(())
        }
        LabCommand::Kill { lab, node } => {
            let mut lab = Lab::open(&lab, mesh_bin)?;
            let pid = lab.node(&node)?.pid;
            let name = lab.node(&node)?.name.clone();
            if lab.kill(&node)? {
                println!("{name}: daemon killed (pid {})", pid.unwrap_or_default());
            } else {
                println!("{name}: daemon was not running");
            }
            Ok(())
        }
        LabCommand::Start { lab, node } => {
            let mut lab = Lab::open(&lab, mesh_bin)?;
            lab.start(&node)?;
            let n = lab.node(&node)?;
            println!(
                "{}: daemon running (pid {})",
                n.name,
                n.pid.unwrap_or_default()
            );
            Ok(())
        }
        LabCommand::Cut { lab, node } => {
            let mut lab = Lab::open(&lab, mesh_bin)?;
            lab.cut(&node)?;
            println!("{}: underlay link cut", lab.node(&node)?.name);
            Ok(())
        }
        LabCommand::Heal {
            lab,
            node: Some(node),
        } => {
            let mut lab = Lab::open(&lab, mesh_bin)?;
            lab.heal(&node)?;
            println!("{}: underlay link restored", lab.node(&node)?.name);
            Ok(())
        }
        LabCommand::Heal { lab, node: None } => {
            let mut lab = Lab::open(&lab, mesh_bin)?;
            lab.heal_all()?;
            println!(
                "lab {}: partitions, cut links and paused daemons restored",
                lab.name
            );
            Ok(())
        }
        LabCommand::Partition { lab, groups } => {
            let mut lab = Lab::open(&lab, mesh_bin)?;
            let groups = parse_groups(&groups);
            let refs: Vec<Vec<&str>> = groups
                .iter()
                .map(|g| g.iter().map(String::as_str).collect())
                .collect();
            let refs: Vec<&[&str]> = refs.iter().map(Vec::as_slice).collect();
            lab.partition(&refs)?;
            println!("lab {}: partitioned {}", lab.name, partition_text(&lab));
            Ok(())
        }
        LabCommand::Pause { lab, node } => {
            let mut lab = Lab::open(&lab, mesh_bin)?;
            lab.pause(&node)?;
            println!("{}: daemon paused", lab.node(&node)?.name);
            Ok(())
        }
        LabCommand::Resume { lab, node } => {
            let mut lab = Lab::open(&lab, mesh_bin)?;
            lab.resume(&node)?;
            println!("{}: daemon resumed", lab.node(&node)?.name);
            Ok(())
        }
        LabCommand::Down { lab } => {
            registry::down(&lab)?;
            println!("lab {lab} removed");
            Ok(())
        }
        // It speaks gRPC: the `mesh` binary runs it, not this crate.
        LabCommand::Sim { .. } => Err(LabError::InvalidSpec(
            "`mesh lab sim` is run by the mesh binary".into(),
        )),
    }
}

/// `node1,node2 | node3`: the groups of a lab's partition.
fn partition_text(lab: &Lab) -> String {
    lab.partition
        .iter()
        .map(|g| g.join(","))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// What `lab ls` shows in DAEMON.
fn daemon_text(n: &crate::spec::LabNode) -> &'static str {
    match (n.running(), n.paused) {
        (true, true) => "paused",
        (true, false) => "running",
        (false, _) => "dead",
    }
}

/// Prints rows with columns padded to their widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_up(lab: &Lab) {
    let mut rows: Vec<Vec<String>> = lab
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.role.to_string(),
                n.ip.to_string(),
                n.socket.display().to_string(),
                n.pid.map(|p| p.to_string()).unwrap_or_default(),
            ]
        })
        .collect();
    rows.extend(lab.hosts.iter().map(|h| {
        vec![
            h.name.clone(),
            "host".into(),
            h.ip.to_string(),
            "-".into(),
            "-".into(),
        ]
    }));
    print_table(&["NODE", "ROLE", "ADDRESS", "SOCKET", "PID"], &rows);
    let name = &lab.name;
    let last = lab.nodes.last().map(|n| n.name.as_str()).unwrap_or("node1");
    let first_ip = lab
        .nodes
        .first()
        .map(|n| n.ip.to_string())
        .unwrap_or_default();
    println!();
    let hosts = match lab.hosts.len() {
        0 => String::new(),
        n => format!(" and {n} outside host(s)"),
    };
    println!(
        "lab {name} is up: {} nodes{hosts} on {} (bridge {UNDERLAY_BRIDGE} in netns {})",
        lab.nodes.len(),
        lab.subnet(),
        lab.underlay_netns
    );
    println!("  mesh lab exec {name} node1 -- mesh node ls");
    println!("  mesh lab exec {name} {last} -- ping -c1 {first_ip}");
    if let Some(h) = lab.hosts.first() {
        println!("  mesh lab exec {name} {} -- ping -c1 {first_ip}", h.name);
    }
    println!("  logs: {}/<node>/daemon.log", lab.dir.display());
    println!("  mesh lab down {name}");
}

fn print_ls_table(labs: &[LabListing]) {
    let mut rows = Vec::new();
    let mut stale = Vec::new();
    let mut incomplete = Vec::new();
    for l in labs {
        match &l.lab {
            Some(lab) => {
                let status = match lab.status {
                    LabStatus::Ready => "ready",
                    LabStatus::Creating => {
                        incomplete.push(lab.name.clone());
                        "incomplete"
                    }
                };
                for n in &lab.nodes {
                    rows.push(vec![
                        lab.name.clone(),
                        status.into(),
                        n.name.clone(),
                        n.role.to_string(),
                        n.ip.to_string(),
                        n.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        daemon_text(n).into(),
                        if n.cut { "cut" } else { "up" }.into(),
                        n.socket.display().to_string(),
                    ]);
                }
                // Outside hosts have no daemon: their DAEMON and SOCKET cells are "-".
                for h in &lab.hosts {
                    rows.push(vec![
                        lab.name.clone(),
                        status.into(),
                        h.name.clone(),
                        "host".into(),
                        h.ip.to_string(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                    ]);
                }
            }
            None => {
                rows.push(vec![
                    l.name.clone(),
                    "stale".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    l.stale_netns.join(","),
                ]);
                stale.push(l.name.clone());
            }
        }
    }
    print_table(
        &[
            "LAB", "STATUS", "NODE", "ROLE", "ADDRESS", "PID", "DAEMON", "LINK", "SOCKET",
        ],
        &rows,
    );
    for l in labs {
        if let Some(lab) = l.lab.as_ref().filter(|lab| !lab.partition.is_empty()) {
            println!("lab {} is partitioned: {}", lab.name, partition_text(lab));
        }
    }
    for s in incomplete {
        eprintln!(
            "lab {s} is incomplete: its `up` is still running or was interrupted (then `mesh lab down {s}`)"
        );
    }
    for s in stale {
        eprintln!("lab {s} is a leftover of a crashed run: remove it with `mesh lab down {s}`");
    }
}

fn listing_json(l: &LabListing) -> serde_json::Value {
    match &l.lab {
        Some(lab) => json!({
            "Name": lab.name,
            "Status": match lab.status {
                LabStatus::Ready => "ready",
                LabStatus::Creating => "incomplete",
            },
            "Subnet": lab.subnet(),
            "UnderlayNetns": lab.underlay_netns,
            "Dir": lab.dir,
            "Nodes": lab.nodes.iter().map(|n| json!({
                "Name": n.name,
                "Role": n.role,
                "Address": n.ip,
                "Netns": n.netns,
                "Socket": n.socket,
                "StateDir": n.state_dir,
                "Log": n.log,
                "Pid": n.pid,
                "Running": n.running(),
                "Paused": n.paused && n.running(),
                "Link": if n.cut { "cut" } else { "up" },
                "ID": n.id,
            })).collect::<Vec<_>>(),
            "Partition": lab.partition,
            "Hosts": lab.hosts.iter().map(|h| json!({
                "Name": h.name,
                "Address": h.ip,
                "Netns": h.netns,
            })).collect::<Vec<_>>(),
        }),
        None => json!({
            "Name": l.name,
            "Status": "stale",
            "Problem": l.problem,
            "StaleNetns": l.stale_netns,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        lab: LabCommand,
    }

    fn parse(args: &[&str]) -> LabCommand {
        let mut argv = vec!["lab"];
        argv.extend(args);
        match Cli::try_parse_from(argv) {
            Ok(c) => c.lab,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn up_defaults_and_init_args() {
        match parse(&["up"]) {
            LabCommand::Up {
                nodes,
                managers,
                hosts,
                name,
                init_args,
                ..
            } => {
                assert_eq!((nodes, managers, hosts, name.as_str()), (3, 1, 0, "lab"));
                assert!(init_args.is_empty());
            }
            other => panic!("{other:?}"),
        }
        match parse(&[
            "up",
            "--nodes",
            "5",
            "--managers",
            "3",
            "--name",
            "t1",
            "--init-arg=--cert-expiry",
            "--init-arg",
            "1m",
            "--hosts",
            "2",
        ]) {
            LabCommand::Up {
                nodes,
                managers,
                hosts,
                init_args,
                ..
            } => {
                assert_eq!((nodes, managers, hosts), (5, 3, 2));
                assert_eq!(init_args, ["--cert-expiry", "1m"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exec_takes_the_rest() {
        match parse(&[
            "exec", "t1", "node1", "--", "mesh", "node", "ls", "--format", "json",
        ]) {
            LabCommand::Exec { lab, node, cmd } => {
                assert_eq!((lab.as_str(), node.as_str()), ("t1", "node1"));
                assert_eq!(cmd, ["mesh", "node", "ls", "--format", "json"]);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["exec", "t1", "2", "ping", "-c1", "192.168.1.11"]) {
            LabCommand::Exec { cmd, .. } => assert_eq!(cmd, ["ping", "-c1", "192.168.1.11"]),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["lab", "exec", "t1", "node1"]).is_err());
    }

    #[test]
    fn exec_refuses_an_unknown_flag_before_the_command() {
        let e = Cli::try_parse_from(["lab", "exec", "t1", "node1", "--bogus", "ls"])
            .err()
            .map(|e| e.kind());
        assert_eq!(e, Some(clap::error::ErrorKind::UnknownArgument));
        // After `--` everything is the command, flags included.
        match parse(&["exec", "t1", "node1", "--", "--bogus"]) {
            LabCommand::Exec { cmd, .. } => assert_eq!(cmd, ["--bogus"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fault_commands() {
        match parse(&["partition", "t1", "node1,node2", "3,node4"]) {
            LabCommand::Partition { lab, groups } => {
                assert_eq!(lab, "t1");
                assert_eq!(groups, ["node1,node2", "3,node4"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["heal", "t1"]),
            LabCommand::Heal { node: None, .. }
        ));
        assert!(matches!(
            parse(&["heal", "t1", "node2"]),
            LabCommand::Heal { node: Some(_), .. }
        ));
        assert!(matches!(
            parse(&["pause", "t1", "2"]),
            LabCommand::Pause { .. }
        ));
        assert!(matches!(
            parse(&["resume", "t1", "2"]),
            LabCommand::Resume { .. }
        ));
        // One group is not a partition.
        #[derive(Debug, clap::Parser)]
        struct C {
            #[command(subcommand)]
            lab: LabCommand,
        }
        assert!(C::try_parse_from(["lab", "partition", "t1", "node1"]).is_err());
    }

    #[test]
    fn ls_format() {
        assert!(matches!(
            parse(&["ls", "--format", "json"]),
            LabCommand::Ls {
                format: Format::Json
            }
        ));
        assert!(matches!(
            parse(&["ls"]),
            LabCommand::Ls {
                format: Format::Table
            }
        ));
    }
}
