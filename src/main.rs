//! `mesh`: the command line and the daemon in one binary. This crate only
//! parses commands, talks to the daemon, prints results, and wires the
//! daemon's parts together; the logic lives in the library crates.
//!
//! - `cli`: the command line (clap), in Docker's words and flags; refuses
//!   unknown flags and what is not built yet before anything runs;
//! - `client`: the CLI's connection to its local daemon;
//! - `cluster_cmd` (init, join, join-token, leave, info), `node_cmd`,
//!   `network_cmd`, `sandbox_cmd` (run, ps, exec, rm, port, inspect), `service_cmd`: one
//!   command group each: build the request, print the answer;
//! - `table`: aligned tables as Docker prints them;
//! - `sim`: `mesh lab sim`, simulated nodes speaking the real protocol;
//! - `daemon`: `mesh daemon`, the node agent process and its wiring.

mod cli;
mod client;
mod cluster_cmd;
mod daemon;
mod network_cmd;
mod node_cmd;
mod sandbox_cmd;
mod service_cmd;
mod sim;
mod table;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Cmd};

fn main() -> ExitCode {
    if let Some(msg) = non_utf8_argument(std::env::args_os()) {
        eprintln!("Error: {msg}");
        return ExitCode::from(2);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if matches!(cli.cmd, Cmd::Daemon(_)) {
            "info,openraft=warn"
        } else {
            "warn"
        })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Cmd::Lab(mesh_lab::LabCommand::Sim {
        lab,
        nodes,
        join_concurrency,
    }) = cli.cmd
    {
        // Its whole process lives in the simulator's namespace (entered
        // before any runtime thread exists), so `mesh lab down` finds it.
        let args = sim::SimArgs {
            lab,
            nodes,
            join_concurrency,
        };
        return match sim::main(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("Error: {}", one_line(&e));
                ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Usage errors on one line, like every other refusal; help and version
/// are printed as clap prints them.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit()
    }
    let text = e.render().to_string();
    let msg = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("Error: {}", msg.strip_prefix("error: ").unwrap_or(&msg));
    ExitCode::from(2)
}

/// clap says only "invalid UTF-8 was detected in one or more arguments":
/// this names the argument (bytes escaped, the start of it if long) and the
/// flag it is the value of.
fn non_utf8_argument(args: impl Iterator<Item = std::ffi::OsString>) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let args: Vec<std::ffi::OsString> = args.collect();
    let i = args.iter().position(|a| a.to_str().is_none())?;
    let bytes = args[i].as_bytes();
    let shown = bytes[..bytes.len().min(60)].escape_ascii();
    let more = if bytes.len() > 60 { "..." } else { "" };
    let of = i
        .checked_sub(1)
        .and_then(|j| args[j].to_str())
        .filter(|flag| flag.starts_with('-'))
        .map(|flag| format!(" (the value of {flag})"))
        .unwrap_or_default();
    Some(format!(
        "argument \"{shown}{more}\"{of} is not valid UTF-8: mesh takes text arguments only"
    ))
}

/// Errors are shown on one line: the chain joined with ": ".
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let host = cli.host.clone();
    match cli.cmd {
        Cmd::Daemon(a) => {
            daemon::run(daemon::DaemonOptions {
                state_dir: a.state_dir,
                socket: a.socket,
                snapshot_every: a.raft_snapshot_every,
                dns_upstream: a.dns_upstream,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Init(a) => cluster_cmd::init(&host, a).await,
        Cmd::Join(a) => cluster_cmd::join(&host, a).await,
        Cmd::JoinToken(a) => cluster_cmd::join_token(&host, a).await,
        Cmd::Leave(a) => cluster_cmd::leave(&host, a).await,
        Cmd::Info(a) => cluster_cmd::info(&host, a).await,
        Cmd::Node(c) => node_cmd::run(&host, c).await,
        Cmd::Network(c) => network_cmd::run(&host, c).await,
        Cmd::Service(c) => service_cmd::run(&host, c).await,
        Cmd::Run(a) => sandbox_cmd::run(&host, a).await,
        Cmd::Ps { all, format, quiet } => sandbox_cmd::ps(&host, all, format, quiet).await,
        Cmd::Exec { sandbox, cmd } => sandbox_cmd::exec(&host, &sandbox, cmd).await,
        Cmd::Rm { force, sandboxes } => sandbox_cmd::rm(&host, force, sandboxes).await,
        Cmd::Port { sandbox, port } => sandbox_cmd::port(&host, &sandbox, port).await,
        Cmd::Inspect { sandboxes } => sandbox_cmd::inspect(&host, sandboxes).await,
        Cmd::Lab(c) => {
            // The lab drives this same binary for its daemons and commands.
            let exe = std::env::current_exe()?;
            tokio::task::spawn_blocking(move || mesh_lab::run(c, &exe)).await??;
            Ok(ExitCode::SUCCESS)
        }
    }
}
