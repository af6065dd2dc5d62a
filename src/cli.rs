//! The command line, in Docker's words and flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use mesh_common::ports::{PortBinding, ServicePort};

#[derive(Parser)]
#[command(
    name = "mesh",
    version,
    about = "Swarm-style overlay network controller"
)]
pub struct Cli {
    /// Daemon socket to talk to.
    #[arg(short = 'H', long = "host", env = "MESH_HOST", default_value = crate::client::DEFAULT_HOST, global = true)]
    pub host: String,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the node agent (systemd runs this).
    Daemon(DaemonArgs),
    /// Create a new cluster with this node as its first manager.
    Init(InitArgs),
    /// Join a cluster as a worker or manager (the token decides).
    Join(JoinArgs),
    /// Show or rotate the join tokens.
    JoinToken(JoinTokenArgs),
    /// Leave the cluster.
    Leave(LeaveArgs),
    /// Show this node's view of the cluster.
    Info(InfoArgs),
    /// Manage nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Manage networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Manage services (managers only).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Start a sandbox: CMD in its own network, mount and UTS namespaces.
    Run(RunArgs),
    /// List this node's sandboxes.
    Ps {
        #[arg(short, long)]
        all: bool,
        #[arg(long, value_parser = ["json"])]
        format: Option<String>,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Run a command inside a sandbox.
    Exec {
        #[arg(value_parser = reference)]
        sandbox: String,
        /// Command and arguments: after `--`, or from the first word that
        /// is not a flag.
        #[arg(trailing_var_arg = true, required = true)]
        cmd: Vec<String>,
    },
    /// Remove sandboxes.
    Rm {
        #[arg(short, long)]
        force: bool,
        #[arg(required = true, value_parser = reference)]
        sandboxes: Vec<String>,
    },
    /// List a sandbox's published ports, or the host side of one of them.
    Port {
        #[arg(value_parser = reference)]
        sandbox: String,
        /// PORT[/PROTOCOL] inside the sandbox (tcp if none).
        port: Option<String>,
    },
    /// Show sandboxes as `docker inspect` does (JSON array).
    Inspect {
        #[arg(required = true, value_parser = reference)]
        sandboxes: Vec<String>,
    },
    /// Multi-node labs of network namespaces on this machine.
    #[command(subcommand)]
    Lab(mesh_lab::LabCommand),
}

#[derive(Args)]
pub struct DaemonArgs {
    #[arg(long, default_value = "/var/lib/mesh")]
    pub state_dir: PathBuf,
    #[arg(long, default_value = "/run/mesh/mesh.sock")]
    pub socket: PathBuf,
    /// Upstream DNS servers for names the embedded DNS does not own
    /// (IP or IP:PORT, repeatable); default: the host's /etc/resolv.conf.
    #[arg(long = "dns-upstream", value_parser = parse_upstream)]
    pub dns_upstream: Vec<std::net::SocketAddr>,
    /// Raft log entries between snapshots (managers).
    #[arg(long, default_value_t = mesh_manager::manager::SNAPSHOT_EVERY, value_parser = clap::value_parser!(u64).range(10..))]
    pub raft_snapshot_every: u64,
}

#[derive(Args)]
pub struct InitArgs {
    /// Address other nodes reach this one at (IP or IP:PORT).
    #[arg(long, default_value = "")]
    pub advertise_addr: String,
    /// Address the cluster port listens on.
    #[arg(long, default_value = "0.0.0.0:2377")]
    pub listen_addr: String,
    /// Validity of node certificates (e.g. 2160h, 30m).
    #[arg(long, default_value = "2160h", value_parser = parse_duration)]
    pub cert_expiry: std::time::Duration,
    /// Address pool cluster subnets are carved from (repeatable; default 10.0.0.0/8).
    #[arg(long = "default-addr-pool")]
    pub default_addr_pool: Vec<String>,
    /// Prefix length of the subnets carved from the pools.
    #[arg(long = "default-addr-pool-mask-length", default_value_t = 24, value_parser = nonzero_mask)]
    pub default_addr_pool_mask_length: u32,
    /// UDP port for VXLAN traffic between nodes.
    #[arg(long = "data-path-port", default_value_t = 4789, value_parser = nonzero_port)]
    pub data_path_port: u32,
    /// How often every node replaces its WireGuard key for encrypted
    /// overlays (e.g. 12h; at least 1m; 0 or absent = only on `node update
    /// --rotate-key`).
    #[arg(long = "encryption-key-rotation", value_parser = parse_rotation)]
    pub encryption_key_rotation: Option<std::time::Duration>,
    /// How often nodes heartbeat to the leader (e.g. 200ms, 5s; 100ms to
    /// 1m; default 200ms).
    #[arg(long = "dispatcher-heartbeat", value_parser = parse_liveness_duration)]
    pub dispatcher_heartbeat: Option<std::time::Duration>,
    /// Silence after which a node is Down and its tasks move elsewhere
    /// (e.g. 800ms, 30s; at least 3 heartbeats; default 4 heartbeats). A
    /// node whose host still answers (its daemon restarting; its tasks run
    /// on) gets 5s more.
    #[arg(long = "node-down-grace", value_parser = parse_liveness_duration)]
    pub node_down_grace: Option<std::time::Duration>,
}

/// A heartbeat period or down grace: a positive duration (the bounds that
/// depend on each other are checked by the daemon, which knows both).
fn parse_liveness_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (e.g. 200ms, 5s)"))?;
    if d.is_zero() {
        return Err("0 is not a period: leave the flag out for the default".into());
    }
    Ok(d)
}

fn parse_upstream(s: &str) -> Result<std::net::SocketAddr, String> {
    s.parse::<std::net::SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| std::net::SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("invalid DNS upstream {s:?}: use IP or IP:PORT"))
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (e.g. 2160h, 30m)"))?;
    if d < std::time::Duration::from_secs(10) {
        return Err(format!(
            "{s} is too short for a certificate lifetime: use at least 10s"
        ));
    }
    Ok(d)
}

fn parse_rotation(s: &str) -> Result<std::time::Duration, String> {
    if s == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?}: {e} (e.g. 12h, 30m)"))?;
    if !d.is_zero() && d.as_secs() < mesh_manager::control::cluster::MIN_KEY_ROTATION_SECS {
        return Err(format!(
            "{s} is too short for a key rotation interval: use at least 1m, or 0 for never"
        ));
    }
    if d.as_secs() > mesh_manager::control::cluster::MAX_KEY_ROTATION_SECS {
        return Err(format!(
            "{s} is too long for a key rotation interval: use at most 8760h (a year), or 0 for never"
        ));
    }
    Ok(d)
}

/// A name or ID a command refers to: never empty, so a refusal never reads
/// "no such network: " with nothing after it.
fn reference(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("it is empty: give a name or ID".into());
    }
    Ok(s.to_string())
}

/// A key to remove (`--label-rm`, `--env-rm`, `--constraint-rm`).
fn not_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("it is empty: give the key to remove".into());
    }
    Ok(s.to_string())
}

/// A DNS alias, checked as the daemon checks it.
fn alias(s: &str) -> Result<String, String> {
    mesh_common::input::check_alias(s).map_err(|e| e.message)?;
    Ok(s.to_string())
}

/// The API reads 0 as "left out"; typed by a user it is a mistake.
fn nonzero_mask(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("0 leaves no network part: use 8 to 29".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a prefix length: use 8 to 29")),
    }
}

/// As [`nonzero_mask`], for `--data-path-port`.
fn nonzero_port(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("0 is not a port: use 1024 to 49151".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a port number: use 1024 to 49151")),
    }
}

#[derive(Args)]
pub struct JoinArgs {
    #[arg(long)]
    pub token: String,
    #[arg(long, default_value = "")]
    pub advertise_addr: String,
    #[arg(long, default_value = "0.0.0.0:2377")]
    pub listen_addr: String,
    /// A manager's address, HOST[:PORT].
    pub remote: String,
}

#[derive(Args)]
pub struct JoinTokenArgs {
    /// Print only the token.
    #[arg(short, long)]
    pub quiet: bool,
    /// Replace the token; the old one stops working.
    #[arg(long)]
    pub rotate: bool,
    #[arg(value_parser = ["worker", "manager"])]
    pub role: String,
}

#[derive(Args)]
pub struct LeaveArgs {
    #[arg(short, long)]
    pub force: bool,
}

#[derive(Args)]
pub struct InfoArgs {
    #[arg(short, long, value_parser = ["json"])]
    pub format: Option<String>,
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// List nodes.
    #[command(alias = "list")]
    Ls {
        #[arg(short, long)]
        filter: Vec<String>,
        #[arg(long, value_parser = ["json"])]
        format: Option<String>,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Show nodes as JSON.
    Inspect {
        #[arg(required = true, value_parser = reference)]
        nodes: Vec<String>,
    },
    /// Remove nodes from the cluster.
    #[command(alias = "remove")]
    Rm {
        #[arg(short, long)]
        force: bool,
        #[arg(required = true, value_parser = reference)]
        nodes: Vec<String>,
    },
    /// Make nodes managers.
    Promote {
        #[arg(required = true, value_parser = reference)]
        nodes: Vec<String>,
    },
    /// Make managers workers.
    Demote {
        #[arg(required = true, value_parser = reference)]
        nodes: Vec<String>,
    },
    /// Change a node's availability or labels.
    Update {
        #[arg(long, value_parser = ["active", "pause", "drain"])]
        availability: Option<String>,
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        #[arg(long = "label-rm", value_parser = not_empty)]
        label_rm: Vec<String>,
        /// Make the node replace its WireGuard key (encrypted overlays).
        #[arg(long = "rotate-key")]
        rotate_key: bool,
        #[arg(value_parser = reference)]
        node: String,
    },
}

#[derive(Subcommand)]
pub enum NetworkCmd {
    /// Create a network.
    Create {
        /// Driver: overlay (cluster-wide); local drivers come later.
        #[arg(short = 'd', long, default_value = "bridge")]
        driver: String,
        #[arg(long, default_value = "")]
        subnet: String,
        #[arg(long, default_value = "")]
        gateway: String,
        #[arg(long = "ip-range", default_value = "")]
        ip_range: String,
        /// Standalone sandboxes (`mesh run`) may attach.
        #[arg(long)]
        attachable: bool,
        /// No egress to outside the network.
        #[arg(long)]
        internal: bool,
        /// The routing-mesh network (one per cluster).
        #[arg(long)]
        ingress: bool,
        /// Driver options: mtu=N; encrypted (overlay: traffic between nodes
        /// goes through WireGuard).
        #[arg(short = 'o', long = "opt")]
        opt: Vec<String>,
        #[arg(long)]
        label: Vec<String>,
        name: String,
    },
    /// List networks.
    #[command(alias = "list")]
    Ls {
        #[arg(short, long)]
        filter: Vec<String>,
        #[arg(long, value_parser = ["json"])]
        format: Option<String>,
        #[arg(short, long)]
        quiet: bool,
        /// Show full IDs.
        #[arg(long)]
        no_trunc: bool,
    },
    /// Show networks as JSON.
    Inspect {
        #[arg(required = true, value_parser = reference)]
        networks: Vec<String>,
    },
    /// Remove networks.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true, value_parser = reference)]
        networks: Vec<String>,
    },
    /// Connect a running sandbox to a network.
    Connect {
        #[arg(long, value_parser = alias)]
        alias: Vec<String>,
        #[arg(value_parser = reference)]
        network: String,
        #[arg(value_parser = reference)]
        sandbox: String,
    },
    /// Disconnect a sandbox from a network.
    Disconnect {
        #[arg(short, long)]
        force: bool,
        #[arg(value_parser = reference)]
        network: String,
        #[arg(value_parser = reference)]
        sandbox: String,
    },
    /// Remove all unused networks.
    Prune {
        /// Do not ask for confirmation (there is no prompt; kept for Docker's flag).
        #[arg(short, long)]
        force: bool,
    },
}

#[derive(Args)]
pub struct RunArgs {
    #[arg(long, default_value = "")]
    pub name: String,
    #[arg(long, value_parser = reference)]
    pub network: Vec<String>,
    #[arg(long = "network-alias", value_parser = alias)]
    pub network_alias: Vec<String>,
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Run in the background and print the sandbox ID.
    #[arg(short, long)]
    pub detach: bool,
    /// Publish a port: [IP:][HOST_PORT:]CONTAINER_PORT[/udp] (repeatable);
    /// without HOST_PORT the node picks a free one.
    #[arg(short = 'p', long = "publish", value_name = "PORTS", value_parser = parse_binding)]
    pub publish: Vec<PortBinding>,
    /// Command and arguments: after `--`, or from the first word that is
    /// not a flag. No `allow_hyphen_values`: an unknown flag is an error.
    #[arg(trailing_var_arg = true, required = true)]
    pub cmd: Vec<String>,
}

fn parse_binding(s: &str) -> Result<PortBinding, String> {
    mesh_common::ports::parse_binding(s).map_err(|e| e.why)
}

fn parse_service_port(s: &str) -> Result<ServicePort, String> {
    mesh_common::ports::parse_service_port(s).map_err(|e| e.why)
}

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Create a service.
    Create(ServiceCreateArgs),
    /// List services.
    #[command(alias = "list")]
    Ls {
        #[arg(long, value_parser = ["json"])]
        format: Option<String>,
        #[arg(short, long)]
        quiet: bool,
        /// Show full IDs.
        #[arg(long)]
        no_trunc: bool,
    },
    /// List the tasks of services.
    Ps {
        #[arg(long, value_parser = ["json"])]
        format: Option<String>,
        #[arg(short, long)]
        quiet: bool,
        /// Show full IDs.
        #[arg(long)]
        no_trunc: bool,
        #[arg(required = true, value_parser = reference)]
        services: Vec<String>,
    },
    /// Show services as JSON.
    Inspect {
        #[arg(required = true, value_parser = reference)]
        services: Vec<String>,
    },
    /// Change a service; its tasks are replaced one at a time.
    Update(ServiceUpdateArgs),
    /// Change the replica count of replicated services.
    Scale {
        /// Do not wait for the services to converge.
        #[arg(short, long)]
        detach: bool,
        /// Services and their new replica counts.
        #[arg(required = true, value_name = "SERVICE=REPLICAS", value_parser = crate::service_cmd::parse_scale)]
        scales: Vec<(String, u64)>,
    },
    /// Remove services; waits until their tasks have stopped and their
    /// addresses are freed.
    #[command(alias = "remove")]
    Rm {
        /// Return once the removal is recorded, without waiting for the tasks.
        #[arg(short, long)]
        detach: bool,
        #[arg(required = true, value_parser = reference)]
        services: Vec<String>,
    },
    /// Show the output of a service's tasks.
    Logs {
        #[arg(value_parser = reference)]
        service: String,
    },
}

#[derive(Args)]
pub struct ServiceCreateArgs {
    /// The service's name, which is also its DNS name on its networks.
    #[arg(long)]
    pub name: String,
    /// Number of tasks (replicated mode).
    #[arg(long, allow_negative_numbers = true, value_parser = crate::service_cmd::parse_replicas)]
    pub replicas: Option<u64>,
    #[arg(long, default_value = "replicated", value_parser = ["replicated", "global"])]
    pub mode: String,
    /// Overlay network to attach to (repeatable).
    #[arg(long, value_parser = reference)]
    pub network: Vec<String>,
    #[arg(long = "endpoint-mode", default_value = "vip", value_parser = ["vip", "dnsrr"])]
    pub endpoint_mode: String,
    /// K=V (repeatable); a bare K takes its value from this shell.
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Placement constraint, e.g. node.role==worker (repeatable).
    #[arg(long)]
    pub constraint: Vec<String>,
    #[arg(long = "restart-condition", default_value = "any", value_parser = ["any", "on-failure", "none"])]
    pub restart_condition: String,
    /// Wait between restarts (e.g. 5s, 500ms; default 5s).
    #[arg(long = "restart-delay", allow_hyphen_values = true, value_parser = crate::service_cmd::parse_delay)]
    pub restart_delay: Option<std::time::Duration>,
    /// Restarts before giving up (0 = unlimited).
    #[arg(long = "restart-max-attempts", default_value_t = 0)]
    pub restart_max_attempts: u64,
    /// K=V (repeatable).
    #[arg(long)]
    pub label: Vec<String>,
    /// Print the ID and return without waiting for the tasks to run.
    #[arg(short, long)]
    pub detach: bool,
    /// Publish a port: published=P,target=T[,protocol=tcp|udp][,mode=ingress|host]
    /// or P:T[/udp] (repeatable); without a published port one is taken
    /// from 30000-32767.
    #[arg(short = 'p', long = "publish", value_name = "PORT", value_parser = parse_service_port)]
    pub publish: Vec<ServicePort>,
    #[command(flatten)]
    pub health: Box<crate::service_cmd::HealthArgs>,
    /// Command and arguments: after `--`, or from the first word that is
    /// not a flag; an unknown flag before it is an error.
    #[arg(trailing_var_arg = true, required = true)]
    pub cmd: Vec<String>,
}

#[derive(Args)]
pub struct ServiceUpdateArgs {
    #[arg(long, allow_negative_numbers = true, value_parser = crate::service_cmd::parse_replicas)]
    pub replicas: Option<u64>,
    #[arg(long = "network-add", value_parser = reference)]
    pub network_add: Vec<String>,
    #[arg(long = "network-rm", value_parser = reference)]
    pub network_rm: Vec<String>,
    /// K=V: sets the variable (replacing its old value).
    #[arg(long = "env-add")]
    pub env_add: Vec<String>,
    /// K: removes the variable.
    #[arg(long = "env-rm", value_parser = not_empty)]
    pub env_rm: Vec<String>,
    #[arg(long = "constraint-add")]
    pub constraint_add: Vec<String>,
    #[arg(long = "constraint-rm", value_parser = not_empty)]
    pub constraint_rm: Vec<String>,
    /// Add a published port, as `service create --publish` (repeatable).
    #[arg(long = "publish-add", value_name = "PORT", value_parser = parse_service_port)]
    pub publish_add: Vec<ServicePort>,
    /// Remove a published port: PUBLISHED[/PROTOCOL] (repeatable).
    #[arg(long = "publish-rm", value_name = "PORT")]
    pub publish_rm: Vec<String>,
    #[command(flatten)]
    pub health: Box<crate::service_cmd::HealthArgs>,
    /// Replace every task even if nothing changed.
    #[arg(long)]
    pub force: bool,
    /// Return without waiting for the update to converge.
    #[arg(short, long)]
    pub detach: bool,
    #[arg(value_parser = reference)]
    pub service: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mesh").chain(args.iter().copied()))
    }

    fn run_cmd(args: &[&str]) -> Vec<String> {
        match parse(args).map(|c| c.cmd) {
            Ok(Cmd::Run(a)) => a.cmd,
            Ok(_) => panic!("{args:?}: not run"),
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn run_takes_the_command_after_the_flags() {
        assert_eq!(
            run_cmd(&["run", "-d", "--name", "x", "--", "sh", "-c", "true"]),
            ["sh", "-c", "true"]
        );
        // Without `--`, flags after the first word belong to the command.
        assert_eq!(run_cmd(&["run", "sleep", "-h"]), ["sleep", "-h"]);
        assert_eq!(run_cmd(&["run", "--", "-weird"]), ["-weird"]);
    }

    #[test]
    fn an_unknown_flag_is_an_error_not_the_command() {
        for args in [
            &["run", "-d", "--bogus", "--", "sleep", "1"][..],
            &["run", "--name", "x", "-z", "sleep", "1"],
            &["exec", "x", "--bogus", "ls"],
            &["service", "create", "--name", "s", "--bogus", "sleep", "1"],
        ] {
            let kind = parse(args).err().map(|e| e.kind());
            assert_eq!(kind, Some(ErrorKind::UnknownArgument), "{args:?}");
        }
    }

    #[test]
    fn bad_publish_is_one_clear_line() {
        for (args, says) in [
            (
                &["run", "-d", "-p", "0:80", "--", "cmd"][..],
                "out of range",
            ),
            (
                &["run", "-d", "-p", "80:80/sctp", "--", "cmd"],
                "unknown protocol",
            ),
            (
                &[
                    "service",
                    "create",
                    "--name",
                    "s",
                    "--publish",
                    "published=80",
                    "sleep",
                    "1",
                ],
                "target port is missing",
            ),
            (
                &[
                    "service",
                    "create",
                    "--name",
                    "s",
                    "-p",
                    "target=80,mode=vip",
                    "sleep",
                    "1",
                ],
                "unknown mode",
            ),
        ] {
            let e = parse(args).err().map(|e| (e.kind(), e.to_string()));
            let (kind, text) = e.unwrap_or_else(|| panic!("{args:?} parsed"));
            assert_eq!(kind, ErrorKind::ValueValidation, "{args:?}");
            assert!(text.contains(says), "{text}");
        }
    }
}
